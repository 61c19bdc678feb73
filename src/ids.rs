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

impl DeviceId {
    /// Whether the id is one the hub reserves for its own writers.
    pub fn is_reserved(id: &str) -> bool {
        id.starts_with(CONSOLE_DEVICE_PREFIX) || id.starts_with(DASHBOARD_DEVICE_PREFIX)
    }
}
