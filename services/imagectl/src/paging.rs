//! `--all`: following `next_page_token` until a list is exhausted.

use crate::error::{CliError, Result};
use std::future::Future;

/// One page of a list: its items, the total count and the token of the next page.
pub struct Page<T> {
    pub items: Vec<T>,
    pub total_count: u32,
    pub next_page_token: String,
}

/// Every item of a list, fetching pages with `fetch(page_token)` (the first with an empty
/// token) until the server returns no next token. Returns the items and the last total count.
pub async fn collect_all<T, F, Fut>(mut fetch: F) -> Result<(Vec<T>, u32)>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Page<T>>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let page = fetch(token.clone()).await?;
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok((items, page.total_count));
        }
        if page.next_page_token == token {
            return Err(CliError::Failed(format!(
                "the server returned the same page token twice ({token}); stopping"
            )));
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_are_followed_until_the_token_is_empty() {
        let mut asked = Vec::new();
        let (items, total) = collect_all(|token: String| {
            asked.push(token.clone());
            async move {
                Ok(match token.as_str() {
                    "" => Page {
                        items: vec![1, 2],
                        total_count: 5,
                        next_page_token: "p2".into(),
                    },
                    "p2" => Page {
                        items: vec![3, 4],
                        total_count: 5,
                        next_page_token: "p3".into(),
                    },
                    _ => Page {
                        items: vec![5],
                        total_count: 5,
                        next_page_token: String::new(),
                    },
                })
            }
        })
        .await
        .expect("collected");
        assert_eq!(items, [1, 2, 3, 4, 5]);
        assert_eq!(total, 5);
        assert_eq!(asked, ["", "p2", "p3"]);
    }

    #[tokio::test]
    async fn a_repeated_token_stops_the_loop() {
        let result = collect_all(|_token: String| async {
            Ok(Page {
                items: vec![1],
                total_count: 9,
                next_page_token: "same".into(),
            })
        })
        .await;
        assert!(result.is_err());
    }
}
