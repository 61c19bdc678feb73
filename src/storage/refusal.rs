//! Who caused a database error: a change's own values (rejected for good, in the hub's words),
//! the database or the connection (retried later), or neither known (the batch fails alone).
//! Postgres's own text is logged where the error is seen, never sent to a client: it can name
//! another tenant's key ("Key (id)=(…) already exists").

use protocol::ErrorCode;
use sqlx::postgres::PgDatabaseError;

/// The keys of the hub's own log (migration 0015): a violation there is the hub's fault (the
/// group commit handles the one it expects, a seq taken by another writer), never a change's.
const LOG_KEYS: [&str; 2] = ["log_groups_pkey", "log_device_ranges_pkey"];

/// What a database error says about the change that met it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blame {
    /// The change itself: its values or its key. The same change fails the same
    /// way every time, so it is rejected for good with this code and message.
    Change(ErrorCode, String),
    /// The connection, the server, a lock or a timeout: nothing to do with the change, which
    /// may succeed when retried.
    Transient,
    /// Neither known to be the change's nor transient, such as a privilege the hub's role lacks
    /// on a table an application trigger writes. The change's batch fails with a temporary
    /// error, and no other batch with it.
    Unknown,
}

impl Blame {
    /// Whether a group that met this error should be committed again piece by piece, to keep
    /// its other batches from failing with it.
    pub fn isolate(&self) -> bool {
        !matches!(self, Blame::Transient)
    }
}

/// Who caused `err`.
pub fn blame(err: &sqlx::Error) -> Blame {
    let Some(db) = err.as_database_error() else {
        // I/O, TLS, pool, protocol: the connection or the hub's side of it.
        return Blame::Transient;
    };
    let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() else { return Blame::Unknown };
    blame_code(pg.code(), pg.constraint(), pg.column())
}

/// [`blame`] from the SQLSTATE and the constraint and column it names (pure, for tests).
fn blame_code(code: &str, constraint: Option<&str>, column: Option<&str>) -> Blame {
    let class = &code[..code.len().min(2)];
    let of_column = |what: &str| match column {
        Some(column) => format!("{what} (column `{column}`)"),
        None => what.to_string(),
    };
    let refused = |message: String| Blame::Change(ErrorCode::InvalidValue, message);
    match (class, code) {
        (_, "23505") if constraint.is_some_and(|c| LOG_KEYS.contains(&c)) => Blame::Unknown,
        (_, "23505") => refused("a value that must be unique is already taken".into()),
        (_, "23502") => refused(of_column("a required value is missing")),
        (_, "23503") => refused("the change refers to a row that does not exist".into()),
        (_, "23514") => refused("a value breaks a check constraint of the table".into()),
        (_, "23P01") => refused("a value conflicts with another row (exclusion constraint)".into()),
        (_, "22001") => refused(of_column("a value is too long for its column")),
        (_, "22003") => refused(of_column("a number is out of its column's range")),
        (_, "22007" | "22008") => refused(of_column("a date or time is not valid")),
        (_, "54000") => refused("a value is too large for the table's index".into()),
        ("22", _) | (_, "42804") => refused(of_column("a value does not fit its column's type")),
        ("23", _) => refused("a value breaks a constraint of the table".into()),
        // Raised by the application's triggers and functions on the change's row.
        ("P0" | "2F" | "38" | "39" | "27" | "44", _) => refused("the table's triggers or rules refused the change".into()),
        // Connection, resources, locks, timeouts (statement_timeout is 57014), shutdown,
        // serialization and deadlocks, and the server's own faults.
        ("08" | "40" | "53" | "57" | "58" | "XX", _) | (_, "55P03" | "55006") => Blame::Transient,
        _ => Blame::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_keys_are_the_changes_fault_in_the_hubs_words() {
        let code = |sqlstate, constraint| match blame_code(sqlstate, constraint, None) {
            Blame::Change(code, _) => Some(code),
            _ => None,
        };
        assert_eq!(code("23505", Some("log_groups_pkey")), None);
        assert_eq!(code("23505", Some("products_pkey")), Some(ErrorCode::InvalidValue));
        for sqlstate in ["22P02", "22003", "22021", "23502", "23503", "23514", "42804", "54000", "P0001"] {
            assert_eq!(code(sqlstate, None), Some(ErrorCode::InvalidValue), "{sqlstate}");
        }
        // Our words, with the column when Postgres names it, never its message.
        assert_eq!(
            blame_code("22P02", None, Some("price_cents")),
            Blame::Change(ErrorCode::InvalidValue, "a value does not fit its column's type (column `price_cents`)".into())
        );
    }

    #[test]
    fn the_database_and_the_connection_are_not_the_changes_fault() {
        for sqlstate in ["08006", "40001", "40P01", "53300", "57014", "57P01", "55P03", "XX000"] {
            assert_eq!(blame_code(sqlstate, None, None), Blame::Transient, "{sqlstate}");
            assert!(!blame_code(sqlstate, None, None).isolate());
        }
        assert_eq!(blame_code("42501", None, None), Blame::Unknown);
        assert!(Blame::Unknown.isolate());
        assert_eq!(blame(&sqlx::Error::PoolTimedOut), Blame::Transient);
    }
}
