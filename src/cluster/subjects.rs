//! NATS subject names: one subject per tenant (`<prefix>.t.<tenant>`), which a node subscribes
//! to only while it serves the tenant (interest routing: a tenant's traffic reaches only the
//! nodes that hold its sessions), and one for the nodes' heartbeats (`<prefix>.nodes`).
//! Pure: no I/O.

use std::fmt::Write;

use crate::ids::TenantId;

/// The subject of a tenant's messages. A tenant id is any text, and NATS tokens may not hold
/// `.`, `*`, `>` or white space: bytes other than letters, digits, `-` and `_` are written as
/// `~` and two hex digits (and `~` itself too), so that distinct tenants never share a subject.
pub fn tenant(prefix: &str, tenant: &TenantId) -> String {
    let id = tenant.as_str();
    let mut subject = String::with_capacity(prefix.len() + 3 + id.len());
    subject.push_str(prefix);
    subject.push_str(".t.");
    if id.is_empty() {
        subject.push('~');
    }
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            subject.push(byte as char);
        } else {
            let _ = write!(subject, "~{byte:02x}");
        }
    }
    subject
}

/// The subject of the nodes' heartbeats and leave notices.
pub fn nodes(prefix: &str) -> String {
    format!("{prefix}.nodes")
}

/// The subject of requests about sessions (their token refreshes), which every node hears and
/// the node holding the session answers.
pub fn session_control(prefix: &str) -> String {
    format!("{prefix}.sessions")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_ids_read_as_they_are() {
        assert_eq!(tenant("synchub", &TenantId::new("acme-coffee_7")), "synchub.t.acme-coffee_7");
        assert_eq!(nodes("synchub"), "synchub.nodes");
    }

    #[test]
    fn separators_and_wildcards_are_escaped() {
        assert_eq!(tenant("s", &TenantId::new("a.b*c>d e~")), "s.t.a~2eb~2ac~3ed~20e~7e");
        assert_eq!(tenant("s", &TenantId::new("")), "s.t.~");
    }

    proptest! {
        /// One token after the prefix, only characters NATS allows, and no two tenants alike.
        #[test]
        fn every_tenant_gets_its_own_valid_token(a in ".{0,24}", b in ".{0,24}") {
            let (sa, sb) = (tenant("p", &TenantId::new(a.as_str())), tenant("p", &TenantId::new(b.as_str())));
            let token = sa.strip_prefix("p.t.").unwrap();
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'~'));
            prop_assert_eq!(a == b, sa == sb);
        }
    }
}
