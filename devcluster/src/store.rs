//! The object store: every served kind in one versioned map, with a bounded change history for
//! watches.
//!
//! ```text
//!  transact(storage, key, f) ──lock──► f(reader, current) ──► Put / Delete / Unchanged
//!        │ assigns the next resourceVersion, appends a Change to the history, broadcasts it
//!  watch_from(rv) ──lock──► backlog (history after rv, or every object as ADDED) + live receiver
//! ```
//!
//! One mutex guards everything, so a transaction sees a consistent cluster (admission can read
//! other kinds) and resourceVersions are totally ordered, as etcd's revisions are.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;
use tokio::sync::broadcast;

use crate::status::ApiError;

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects.
pub type ObjectKey = (String, String);

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Replaced.
    Modified,
    /// Removed.
    Deleted,
}

/// One recorded change.
#[derive(Debug)]
pub struct Change {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// Storage identity of the object's kind.
    pub storage: &'static str,
    /// What happened.
    pub kind: ChangeKind,
    /// The object before (Modified, Deleted).
    pub old: Option<Arc<Value>>,
    /// The object after; for Deleted, the last state with the deletion's resourceVersion.
    pub new: Arc<Value>,
}

/// What a transaction decided.
pub enum Outcome {
    /// Store this object (creating or replacing it).
    Put(Value),
    /// Remove the object.
    Delete,
    /// Change nothing.
    Unchanged,
}

/// Read access to the whole store inside a transaction.
pub struct Reader<'a> {
    inner: &'a Inner,
}

impl Reader<'_> {
    /// The current object, if any.
    pub fn get(&self, storage: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.inner
            .objects
            .get(storage)
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .map(|v| v.as_ref())
    }

    /// The objects of a kind in one namespace, by name.
    pub fn list<'r>(&'r self, storage: &str, namespace: &'r str) -> impl Iterator<Item = &'r Value> + 'r {
        self.inner.objects.get(storage).into_iter().flat_map(move |map| {
            map.range((namespace.to_string(), String::new())..)
                .take_while(move |((ns, _), _)| ns == namespace)
                .map(|(_, v)| v.as_ref())
        })
    }
}

struct Inner {
    rv: u64,
    objects: HashMap<&'static str, BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    /// Watches must start at or after this resourceVersion; older ones get 410 Gone.
    compacted: u64,
    /// Shutting down: the state was saved for the last time, and no write is taken after it (one
    /// taken would be answered and then lost).
    sealed: bool,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch (as an API server restart does).
    epoch: tokio::sync::watch::Sender<u64>,
    history_limit: usize,
}

/// Where a watch starts.
pub enum WatchStart {
    /// Every existing object as ADDED, then changes (no resourceVersion, or "0").
    Snapshot,
    /// Changes after this resourceVersion.
    After(u64),
}

/// A watch's backlog and its live feed.
pub struct WatchFeed {
    /// Changes to send first, in order.
    pub backlog: Vec<Arc<Change>>,
    /// Changes after the backlog (may overlap with it: skip rv <= last sent).
    pub live: broadcast::Receiver<Arc<Change>>,
    /// The resourceVersion the backlog brings the client to.
    pub rv: u64,
    /// Changes when the watch must end (see [`Store::end_watches`]).
    pub ended: tokio::sync::watch::Receiver<u64>,
}

impl Store {
    /// An empty store that keeps the last `history_limit` changes for watches.
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                objects: HashMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                sealed: false,
            }),
            tx,
            epoch: tokio::sync::watch::channel(0).0,
            history_limit: history_limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, storage: &str, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let inner = self.lock();
        inner
            .objects
            .get(storage)?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of a kind (in one namespace, or all), sorted by namespace and name, with the
    /// resourceVersion of the snapshot.
    pub fn list(&self, storage: &str, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = match inner.objects.get(storage) {
            Some(map) => match namespace {
                Some(ns) => map
                    .range((ns.to_string(), String::new())..)
                    .take_while(|((n, _), _)| n == ns)
                    .map(|(_, v)| v.clone())
                    .collect(),
                None => map.values().cloned().collect(),
            },
            None => Vec::new(),
        };
        (items, inner.rv)
    }

    /// Runs `f` on the current object under the store lock and applies its outcome atomically.
    /// Returns the stored object (for Delete: the deleted one) and what changed.
    pub fn transact<F>(
        &self,
        storage: &'static str,
        key: ObjectKey,
        f: F,
    ) -> Result<(Option<Arc<Value>>, Option<ChangeKind>), ApiError>
    where
        F: FnOnce(&Reader<'_>, Option<&Value>) -> Result<Outcome, ApiError>,
    {
        self.transact_with(storage, key, false, f)
    }

    /// [`Store::transact`], or with `dry_run` a transaction that runs the whole write path and
    /// returns what would be stored (with the current resourceVersion), storing nothing and
    /// emitting no watch event, as kube-apiserver's `dryRun=All`.
    pub fn transact_with<F>(
        &self,
        storage: &'static str,
        key: ObjectKey,
        dry_run: bool,
        f: F,
    ) -> Result<(Option<Arc<Value>>, Option<ChangeKind>), ApiError>
    where
        F: FnOnce(&Reader<'_>, Option<&Value>) -> Result<Outcome, ApiError>,
    {
        let mut inner = self.lock();
        if inner.sealed && !dry_run {
            return Err(ApiError::shutting_down());
        }
        let current = inner.objects.get(storage).and_then(|m| m.get(&key)).cloned();
        let outcome = f(&Reader { inner: &inner }, current.as_deref())?;
        if dry_run {
            return Ok(match outcome {
                Outcome::Put(mut obj) => {
                    match current
                        .as_ref()
                        .and_then(|c| c.pointer("/metadata/resourceVersion"))
                    {
                        Some(rv) => obj["metadata"]["resourceVersion"] = rv.clone(),
                        None => {
                            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                                meta.remove("resourceVersion");
                            }
                        }
                    }
                    (Some(Arc::new(obj)), None)
                }
                Outcome::Delete | Outcome::Unchanged => (current, None),
            });
        }
        match outcome {
            Outcome::Unchanged => Ok((current, None)),
            Outcome::Put(mut obj) => {
                inner.rv += 1;
                let rv = inner.rv;
                obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                let obj = Arc::new(obj);
                inner.objects.entry(storage).or_default().insert(key, obj.clone());
                let kind = if current.is_some() {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Added
                };
                self.record(
                    &mut inner,
                    Change {
                        rv,
                        storage,
                        kind,
                        old: current,
                        new: obj.clone(),
                    },
                );
                Ok((Some(obj), Some(kind)))
            }
            Outcome::Delete => match self.remove_locked(&mut inner, storage, &key) {
                Some(gone) => Ok((Some(gone), Some(ChangeKind::Deleted))),
                None => Ok((None, None)),
            },
        }
    }

    /// Removes an object under the lock, recording the deletion; returns its last state.
    fn remove_locked(&self, inner: &mut Inner, storage: &'static str, key: &ObjectKey) -> Option<Arc<Value>> {
        if inner.sealed {
            return None;
        }
        let old = inner.objects.get_mut(storage)?.remove(key)?;
        inner.rv += 1;
        let rv = inner.rv;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let gone = Arc::new(gone);
        self.record(
            inner,
            Change {
                rv,
                storage,
                kind: ChangeKind::Deleted,
                old: Some(old),
                new: gone.clone(),
            },
        );
        Some(gone)
    }

    /// Every object of every kind, with its storage: for garbage collection across kinds.
    pub fn all_objects(&self) -> Vec<(&'static str, Arc<Value>)> {
        let inner = self.lock();
        inner
            .objects
            .iter()
            .flat_map(|(storage, map)| map.values().map(|v| (*storage, v.clone())))
            .collect()
    }

    /// Deletes every object of `storage` (a custom kind whose definition is gone).
    pub fn delete_all(&self, storage: &'static str) {
        let mut inner = self.lock();
        let keys: Vec<ObjectKey> = inner
            .objects
            .get(storage)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for key in keys {
            self.remove_locked(&mut inner, storage, &key);
        }
    }

    /// Deletes every namespaced object in `namespace` (the namespace itself excepted).
    pub fn delete_namespace_contents(&self, namespace: &str) {
        let mut inner = self.lock();
        let storages: Vec<&'static str> = inner.objects.keys().copied().collect();
        for storage in storages {
            let keys: Vec<ObjectKey> = inner.objects[storage]
                .range((namespace.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == namespace)
                .map(|(k, _)| k.clone())
                .collect();
            for key in keys {
                self.remove_locked(&mut inner, storage, &key);
            }
        }
    }

    fn record(&self, inner: &mut Inner, change: Change) {
        let change = Arc::new(change);
        inner.history.push_back(change.clone());
        while inner.history.len() > self.history_limit {
            if let Some(dropped) = inner.history.pop_front() {
                inner.compacted = dropped.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(change);
    }

    /// Drops the whole change history, as etcd compaction does: watches from any earlier
    /// resourceVersion get 410 Gone. Open watches are ended, so their clients resume (and learn).
    pub fn compact(&self) {
        {
            let mut inner = self.lock();
            inner.history.clear();
            inner.compacted = inner.rv;
        }
        self.end_watches();
    }

    /// Every object and the current resourceVersion, for a state file.
    pub fn snapshot(&self) -> Value {
        Self::snapshot_of(&self.lock())
    }

    /// [`Store::snapshot`] for the last time: from now on every write is refused (503, as an API
    /// server shutting down answers), so none is answered that the snapshot does not hold.
    pub fn seal(&self) -> Value {
        let mut inner = self.lock();
        inner.sealed = true;
        Self::snapshot_of(&inner)
    }

    fn snapshot_of(inner: &Inner) -> Value {
        let objects: Vec<Value> = inner
            .objects
            .iter()
            .flat_map(|(storage, map)| {
                map.values()
                    .map(move |o| serde_json::json!({"storage": storage, "object": **o}))
            })
            .collect();
        serde_json::json!({"resourceVersion": inner.rv, "objects": objects})
    }

    /// Loads a snapshot into an empty store. The change history starts empty, so watches from
    /// before the snapshot get 410 Gone, as after an API server restart.
    pub fn restore(&self, snapshot: &Value, storages: &[&'static str]) -> Result<usize, String> {
        let mut inner = self.lock();
        let rv = snapshot
            .get("resourceVersion")
            .and_then(Value::as_u64)
            .ok_or("the state has no resourceVersion")?;
        let objects = snapshot
            .get("objects")
            .and_then(Value::as_array)
            .ok_or("the state has no objects list")?;
        let mut count = 0;
        for entry in objects {
            let storage = entry
                .get("storage")
                .and_then(Value::as_str)
                .ok_or("an entry has no storage")?;
            let storage = *storages
                .iter()
                .find(|s| **s == storage)
                .ok_or_else(|| format!("unknown kind {storage:?} in the state"))?;
            let object = entry.get("object").ok_or("an entry has no object")?;
            let text = |p: &str| {
                object
                    .pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            let key = (text("/metadata/namespace"), text("/metadata/name"));
            if key.1.is_empty() {
                return Err("an object has no name".into());
            }
            inner
                .objects
                .entry(storage)
                .or_default()
                .insert(key, Arc::new(object.clone()));
            count += 1;
        }
        inner.rv = inner.rv.max(rv);
        inner.history.clear();
        inner.compacted = inner.rv;
        Ok(count)
    }

    /// A receiver that changes whenever the store does (for persistence).
    pub fn changes(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Ends every open watch, as an API server restart does; clients resume from their last
    /// resourceVersion.
    pub fn end_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Starts a watch on one kind.
    pub fn watch(&self, storage: &str, start: WatchStart) -> Result<WatchFeed, ApiError> {
        let inner = self.lock();
        let live = self.tx.subscribe();
        let backlog = match start {
            WatchStart::Snapshot => inner
                .objects
                .get(storage)
                .map(|m| {
                    m.values()
                        .map(|obj| {
                            Arc::new(Change {
                                rv: 0,
                                storage: "",
                                kind: ChangeKind::Added,
                                old: None,
                                new: obj.clone(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
            WatchStart::After(rv) => {
                if rv < inner.compacted {
                    return Err(ApiError::gone(rv, inner.compacted));
                }
                inner
                    .history
                    .iter()
                    .filter(|c| c.rv > rv && c.storage == storage)
                    .cloned()
                    .collect()
            }
        };
        let mut ended = self.epoch.subscribe();
        ended.mark_unchanged();
        Ok(WatchFeed {
            backlog,
            live,
            rv: inner.rv,
            ended,
        })
    }
}

/// Keeps a namespaced status up to date, as devcluster's status-keeping controllers (quota,
/// disruption) do: `reconcile(store, namespace)` for the namespace of every change to one of
/// `watched`, and for every namespace holding an object of `kept` at start (objects restored from
/// a state file, or made before this subscribed) and after missed changes, until `stop`.
pub async fn reconcile_namespaces(
    store: Arc<Store>,
    watched: &[&str],
    kept: &str,
    reconcile: fn(&Store, &str),
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = store.changes();
    let reconcile_all = |store: &Store| {
        let (objects, _) = store.list(kept, None);
        let namespaces: std::collections::BTreeSet<&str> = objects
            .iter()
            .filter_map(|o| o.pointer("/metadata/namespace").and_then(Value::as_str))
            .collect();
        for namespace in namespaces {
            reconcile(store, namespace);
        }
    };
    reconcile_all(&store);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            change = changes.recv() => match change {
                Ok(change) if watched.contains(&change.storage) => {
                    let namespace = change
                        .new
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    reconcile(&store, namespace);
                }
                Ok(_) => {}
                // Missed changes: any namespace may be off.
                Err(broadcast::error::RecvError::Lagged(_)) => reconcile_all(&store),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(store: &Store, name: &str, value: i64) -> u64 {
        let (obj, _) = store
            .transact("things", (String::new(), name.into()), |_, _| {
                Ok(Outcome::Put(json!({"metadata": {"name": name}, "v": value})))
            })
            .unwrap();
        obj.unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn resource_versions_are_ordered_and_history_is_bounded() {
        let store = Store::new(3);
        let first = put(&store, "a", 1);
        let mut last = first;
        for i in 0..5 {
            let rv = put(&store, "a", i);
            assert!(rv > last);
            last = rv;
        }
        assert!(matches!(store.watch("things", WatchStart::After(first)), Err(e) if e.code == 410));
        let feed = store.watch("things", WatchStart::After(last - 2)).unwrap();
        assert_eq!(feed.backlog.len(), 2);
        store.compact();
        assert!(store.watch("things", WatchStart::After(last - 1)).is_err());
        assert!(
            store
                .watch("things", WatchStart::After(store.current_rv()))
                .is_ok()
        );
    }

    #[test]
    fn failed_transactions_change_nothing() {
        let store = Store::new(10);
        put(&store, "a", 1);
        let rv = store.current_rv();
        let err = store.transact("things", (String::new(), "a".into()), |_, _| {
            Err(ApiError::bad_request("no"))
        });
        assert!(err.is_err());
        assert_eq!(store.current_rv(), rv);
    }

    #[test]
    fn a_sealed_store_takes_no_write_its_last_snapshot_lacks() {
        let store = Store::new(10);
        put(&store, "a", 1);
        let last = store.seal();
        let refused = store.transact("things", (String::new(), "b".into()), |_, _| {
            Ok(Outcome::Put(json!({"metadata": {"name": "b"}})))
        });
        assert!(matches!(refused, Err(e) if e.code == 503));
        store.delete_all("things");
        assert_eq!(store.snapshot(), last, "nothing changed after the last snapshot");
    }
}
