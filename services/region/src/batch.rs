//! Calls to another service that many tasks make at once, sent together.
//!
//! A [`Batcher`] keeps at most `in_flight` batched calls on the wire. A request that arrives
//! while they are all busy waits in a queue, and the next call to go carries everything queued
//! by then (up to `max_batch`). So at low load each request goes alone at once, and under load
//! the per-call costs (headers, signing, a task on either side) are paid once per batch rather
//! than once per request.
//!
//! Nothing is shared between requests but the wire: every request in a batch is answered by a
//! call that was sent after the request arrived, so an answer is never older than its question
//! (a share check made this way is as fresh as one made alone).

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

type Reply<A> = oneshot::Sender<Result<A, tonic::Status>>;

/// Sends batches of `Q`s, answering each with an `A`. Cheap to clone; the task that sends the
/// batches ends when the last clone is dropped.
pub struct Batcher<Q, A> {
    queue: mpsc::UnboundedSender<(Q, Reply<A>)>,
}

impl<Q, A> Clone for Batcher<Q, A> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

impl<Q: Send + 'static, A: Send + 'static> Batcher<Q, A> {
    /// Starts the sending task on the current runtime. `send` makes one call for a batch and
    /// answers with one `A` per `Q`, in order; an error answers every request of the batch.
    pub fn spawn<F, Fut>(in_flight: usize, max_batch: usize, send: F) -> Self
    where
        F: Fn(Vec<Q>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<A>, tonic::Status>> + Send + 'static,
    {
        let (queue, mut requests) = mpsc::unbounded_channel::<(Q, Reply<A>)>();
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        let max_batch = max_batch.max(1);
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = requests.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match requests.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (questions, replies): (Vec<Q>, Vec<Reply<A>>) = batch.into_iter().unzip();
                let call = send(questions);
                tokio::spawn(async move {
                    let answers = call.await;
                    drop(slot);
                    match answers {
                        Ok(answers) if answers.len() == replies.len() => {
                            for (reply, answer) in replies.into_iter().zip(answers) {
                                let _ = reply.send(Ok(answer));
                            }
                        }
                        Ok(answers) => {
                            let status = tonic::Status::internal(format!(
                                "{} answers to {} requests",
                                answers.len(),
                                replies.len()
                            ));
                            for reply in replies {
                                let _ = reply.send(Err(status.clone()));
                            }
                        }
                        Err(status) => {
                            for reply in replies {
                                let _ = reply.send(Err(status.clone()));
                            }
                        }
                    }
                });
            }
        });
        Batcher { queue }
    }

    /// Sends `question` with the next batch and waits for its answer.
    pub async fn call(&self, question: Q) -> Result<A, tonic::Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((question, reply))
            .map_err(|_| tonic::Status::unavailable("the batching task has stopped"))?;
        answer
            .await
            .map_err(|_| tonic::Status::unavailable("the batching task has stopped"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_lone_request_goes_at_once_and_busy_ones_travel_together() {
        let batches = Arc::new(std::sync::Mutex::new(Vec::<Vec<u32>>::new()));
        let gate = Arc::new(tokio::sync::Notify::new());
        let seen = batches.clone();
        let hold = gate.clone();
        let batcher = Batcher::spawn(1, 100, move |questions: Vec<u32>| {
            let seen = seen.clone();
            let hold = hold.clone();
            async move {
                let first = seen.lock().unwrap().is_empty();
                seen.lock().unwrap().push(questions.clone());
                if first {
                    // The first call stays on the wire until the test lets it go.
                    hold.notified().await;
                }
                Ok(questions.iter().map(|q| q * 10).collect())
            }
        });
        let first = tokio::spawn({
            let b = batcher.clone();
            async move { b.call(1).await }
        });
        while batches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Three more arrive while the first is on the wire: they wait and go as one batch.
        let later: Vec<_> = (2..5)
            .map(|n| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(n).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(batches.lock().unwrap().len(), 1, "nothing sent while busy");
        gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 10);
        for (n, task) in (2..5).zip(later) {
            assert_eq!(task.await.unwrap().unwrap(), n * 10);
        }
        assert_eq!(*batches.lock().unwrap(), vec![vec![1], vec![2, 3, 4]]);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_request_of_its_batch() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let batcher = Batcher::<u32, bool>::spawn(2, 10, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(tonic::Status::unavailable("down")) }
        });
        let answers = futures::future::join_all((0..5).map(|n| batcher.call(n))).await;
        for answer in answers {
            assert_eq!(answer.unwrap_err().code(), tonic::Code::Unavailable);
        }
        assert!(calls.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_not_a_wrong_answer() {
        let batcher = Batcher::<u32, bool>::spawn(1, 10, |_| async { Ok(vec![true]) });
        let answers = futures::future::join_all((0..3).map(|n| batcher.call(n))).await;
        // Whatever the batches were, no request got another's answer: a batch of one is
        // answered, a longer batch is refused as a whole.
        let answered = answers.iter().filter(|a| a.is_ok()).count();
        let refused = answers
            .iter()
            .filter(|a| matches!(a, Err(s) if s.code() == tonic::Code::Internal))
            .count();
        assert_eq!(answered + refused, 3);
    }

    #[tokio::test]
    async fn batches_are_capped() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::spawn(1, 3, move |questions: Vec<u32>| {
            seen.lock().unwrap().push(questions.len());
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(questions)
            }
        });
        let answers = futures::future::join_all((0..10).map(|n| batcher.call(n))).await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), n as u32);
        }
        let sizes = sizes.lock().unwrap();
        assert!(sizes.iter().all(|&s| s <= 3), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 10);
    }
}
