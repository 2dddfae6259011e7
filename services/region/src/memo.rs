//! Values computed from the metadata store, kept while the store has not changed.
//!
//! Each value is tagged with the store's generation (`Store::generation`) read before the reads
//! it was computed from; it is served only while the generation still has that value, so a
//! write that commits makes every kept value stale before its caller hears of it (and a reader
//! never sees the store as it was before a write it knows of).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Values by key (an account), each with its generation and weight, up to `capacity` in all.
pub(crate) struct Memo<V> {
    capacity: usize,
    inner: Mutex<Entries<V>>,
}

struct Entries<V> {
    by_key: HashMap<String, (u64, Arc<V>, usize)>,
    weight: usize,
}

impl<V> Memo<V> {
    /// A memo holding at most `capacity` weight (e.g. rows) over all keys.
    pub(crate) fn new(capacity: usize) -> Self {
        Memo {
            capacity,
            inner: Mutex::new(Entries {
                by_key: HashMap::new(),
                weight: 0,
            }),
        }
    }

    /// The value kept for `key`, if it was computed at `generation`.
    pub(crate) fn get(&self, key: &str, generation: u64) -> Option<Arc<V>> {
        let entries = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match entries.by_key.get(key) {
            Some((at, value, _)) if *at == generation => Some(value.clone()),
            _ => None,
        }
    }

    /// Keeps `value`, computed from reads made at `generation`, for `key`. When full, values
    /// of other generations go first, then everything.
    pub(crate) fn put(&self, key: &str, generation: u64, value: Arc<V>, weight: usize) {
        if weight > self.capacity {
            return;
        }
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entries = &mut *guard;
        if let Some((_, _, old)) = entries.by_key.remove(key) {
            entries.weight -= old;
        }
        if entries.weight + weight > self.capacity {
            entries.by_key.retain(|_, (at, _, _)| *at == generation);
            entries.weight = entries.by_key.values().map(|(_, _, w)| w).sum();
            if entries.weight + weight > self.capacity {
                entries.by_key.clear();
                entries.weight = 0;
            }
        }
        entries
            .by_key
            .insert(key.to_string(), (generation, value, weight));
        entries.weight += weight;
    }

    /// Total weight held (for tests and metrics).
    #[cfg(test)]
    fn weight(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_serves_only_its_generation() {
        let memo = Memo::new(100);
        memo.put("a", 7, Arc::new(vec![1, 2]), 2);
        assert_eq!(*memo.get("a", 7).unwrap(), vec![1, 2]);
        assert!(memo.get("a", 8).is_none(), "the store moved on");
        assert!(memo.get("b", 7).is_none());
        memo.put("a", 8, Arc::new(vec![3]), 1);
        assert_eq!(*memo.get("a", 8).unwrap(), vec![3]);
        assert!(memo.get("a", 7).is_none());
        assert_eq!(
            memo.weight(),
            1,
            "the replaced value's weight is given back"
        );
    }

    #[test]
    fn it_never_holds_more_than_its_capacity() {
        let memo = Memo::new(10);
        for n in 0..100 {
            memo.put(&format!("k{n}"), n / 10, Arc::new(n), 3);
            assert!(memo.weight() <= 10, "weight {} after {n}", memo.weight());
        }
        // Too heavy to keep at all.
        memo.put("big", 9, Arc::new(0), 11);
        assert!(memo.get("big", 9).is_none());
        // Stale values go first: a current one survives a fill.
        let memo = Memo::new(6);
        memo.put("old", 1, Arc::new(1), 3);
        memo.put("new", 2, Arc::new(2), 3);
        memo.put("newer", 2, Arc::new(3), 3);
        assert!(memo.get("new", 2).is_some());
        assert!(memo.get("newer", 2).is_some());
    }
}
