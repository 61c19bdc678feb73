//! Typed identifiers, parsed once at the boundary so the rest of the hub cannot mix them up.

use std::fmt;
use std::sync::Arc;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn new(value: impl Into<Arc<str>>) -> Self {
                $name(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A tenant (organisation, store chain). Always taken from the token.
    TenantId
);
string_id!(
    /// A device (POS terminal, phone): the origin of changes and the owner of a cursor.
    DeviceId
);
string_id!(
    /// A user, from the token's subject claim.
    UserId
);
string_id!(
    /// A hub process in a cluster (`node_id`): who sent a cluster message, whose sessions a
    /// presence entry lists.
    NodeId
);

/// Position in a tenant's change log; gap-free in commit order.
pub type Seq = u64;

/// Per-device change counter (`Change::device_seq`).
pub type DeviceSeq = u64;

/// Identifies one socket's session within this hub process.
pub type SessionId = uuid::Uuid;

/// Device ids the hub gives its own writers; no device or service writer may use them.
/// `console:<user>` writes a reviewer's conflict resolutions, `dashboard:<session>` names a
/// dashboard session.
pub const CONSOLE_DEVICE_PREFIX: &str = "console:";
pub const DASHBOARD_DEVICE_PREFIX: &str = "dashboard:";
/// `rxdb:<device>` writes an RxDB client's documents: the hub numbers its changes, so its
/// cursor must not be shared with a native session of the same device.
pub const RXDB_DEVICE_PREFIX: &str = "rxdb:";
/// Supabase Realtime sockets: `supabase:<session id>`.
pub const SUPABASE_DEVICE_PREFIX: &str = "supabase:";

impl DeviceId {
    /// Whether the id is one the hub reserves for its own writers.
    pub fn is_reserved(id: &str) -> bool {
        id.starts_with(CONSOLE_DEVICE_PREFIX) || id.starts_with(DASHBOARD_DEVICE_PREFIX) || id.starts_with(RXDB_DEVICE_PREFIX)
            || id.starts_with(SUPABASE_DEVICE_PREFIX)
    }
}

/// Why `value` cannot be a tenant, user, role or device id; `None` when it can. Ids come from
/// clients (tokens, `hello`, service pushes) and are stored as Postgres `text` in indexed
/// columns: a NUL (which `text` cannot hold), another control character, or an id longer than
/// an index entry takes would fail the statement that writes it, and with it every other
/// change of its group. So they are refused where they enter, with the client's own error.
pub fn id_problem(value: &str, max_bytes: usize) -> Option<String> {
    if value.is_empty() {
        return Some("is empty".into());
    }
    if value.len() > max_bytes {
        return Some(format!("is {} bytes, more than {max_bytes}", value.len()));
    }
    if value.contains('\0') {
        return Some("holds the character U+0000".into());
    }
    if value.chars().any(char::is_control) {
        return Some("holds a control character".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_that_postgres_cannot_store_are_refused() {
        assert_eq!(id_problem("pos-1", 16), None);
        assert_eq!(id_problem("ünïcode ✓", 16), None);
        assert!(id_problem("", 16).is_some());
        assert!(id_problem("a\0b", 16).is_some());
        assert!(id_problem("a\nb", 16).is_some());
        assert!(id_problem("a\u{7f}", 16).is_some());
        assert!(id_problem("a\u{85}", 16).is_some());
        assert!(id_problem(&"x".repeat(17), 16).is_some());
        assert_eq!(id_problem(&"x".repeat(16), 16), None);
    }

    proptest! {
        /// Whatever is accepted is storable: bounded, and free of NUL and control characters.
        #[test]
        fn accepted_ids_are_storable(value in any::<String>(), max in 1usize..64) {
            if id_problem(&value, max).is_none() {
                prop_assert!(!value.is_empty() && value.len() <= max);
                prop_assert!(!value.chars().any(|c| c == '\0' || c.is_control()));
            }
        }
    }
}
