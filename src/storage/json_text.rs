//! JSON arguments bound as Postgres `json` (text checked to be JSON), not `jsonb` (parsed into a
//! tree and rebuilt in binary), for columns that keep documents as written.

use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo};
use sqlx::{Encode, Postgres, Type};

/// `json` and `json[]` in `pg_type`.
const JSON_OID: Oid = Oid(114);
const JSON_ARRAY_OID: Oid = Oid(199);

/// A value serialized into the argument as `json` text.
pub struct JsonText<T>(pub T);

impl<T> Type<Postgres> for JsonText<T> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_OID)
    }
}

impl<T> PgHasArrayType for JsonText<T> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_ARRAY_OID)
    }
}

impl<T: Serialize> Encode<'_, Postgres> for JsonText<T> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // The binary form of `json` is its text, with no version byte (unlike `jsonb`).
        serde_json::to_writer(&mut **buf, &self.0)?;
        Ok(IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_text_alone() {
        let mut buf = PgArgumentBuffer::default();
        let value = serde_json::json!({"name": "Flat white", "price": 4.5});
        assert!(matches!(JsonText(&value).encode_by_ref(&mut buf), Ok(IsNull::No)));
        assert_eq!(&buf[..], br#"{"name":"Flat white","price":4.5}"#);
        assert_eq!(<JsonText<()> as Type<Postgres>>::type_info().oid(), Some(JSON_OID));
    }
}
