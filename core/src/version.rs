//! Content versions: a stable hash of what is synced, so both sides agree on "same object" across
//! restarts without any shared state.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The content version of a serializable value: the first 16 hex digits of the SHA-256 of its
/// canonical JSON (object keys sorted). Equal content gives equal versions, on any machine.
pub fn content_version<T: Serialize + ?Sized>(value: &T) -> String {
    // serde_json::Value keeps object keys sorted (no `preserve_order`), which makes the form canonical.
    let canonical = serde_json::to_value(value)
        .and_then(|v| serde_json::to_vec(&v))
        .expect("serializing plain data to JSON cannot fail");
    hex::encode(&Sha256::digest(&canonical)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn same_content_same_version_whatever_the_map_order() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..50 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..50).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(content_version(&a), content_version(&b));
        assert_eq!(content_version(&a).len(), 16);
    }

    #[test]
    fn different_content_different_version() {
        let a = BTreeMap::from([("handler", "runsc")]);
        let b = BTreeMap::from([("handler", "kata")]);
        assert_ne!(content_version(&a), content_version(&b));
    }
}
