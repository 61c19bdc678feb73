//! Fast decoding of frames whose `type` key comes first, as this crate and the hub encode
//! them. serde's internally tagged enums buffer every frame into an intermediate tree before
//! they look at `type`; here the tag is read first and the variant's fields are decoded
//! straight from the input. Frames with another key order take the derived decoding.
//!
//! The enums below mirror [`ClientFrame`] and [`ServerFrame`] field for field (serde's remote
//! derive: the compiler refuses a mirror whose fields differ); their serde attributes must
//! match too, which `codec`'s tests check on every golden vector.

use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, EnumAccess, IgnoredAny, IntoDeserializer, MapAccess, VariantAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::*;

#[derive(Deserialize)]
#[serde(remote = "ClientFrame", rename_all = "snake_case")]
enum ClientFrameTypeFirst {
    Hello {
        id: RequestId,
        versions: Vec<u32>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<Position>,
        #[serde(default, skip_serializing_if = "SessionMode::is_device")]
        mode: SessionMode,
    },
    Push {
        id: RequestId,
        batch_id: Uuid,
        changes: Vec<Change>,
    },
    Auth { id: RequestId, token: String },
    Resume { id: RequestId, position: Position },
    Snapshot {
        id: RequestId,
        table: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Object>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Ping { id: RequestId },
    Subscribe {
        id: RequestId,
        sub: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        filter: Vec<Condition>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        snapshot: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<Channel>,
    },
    Unsubscribe { id: RequestId, sub: String },
}

#[derive(Deserialize)]
#[serde(remote = "ServerFrame", rename_all = "snake_case")]
enum ServerFrameTypeFirst {
    Welcome {
        id: RequestId,
        version: u32,
        session_id: Uuid,
        device_id: String,
        epoch: String,
        head_seq: u64,
        limits: Limits,
    },
    Ack {
        id: RequestId,
        batch_id: Uuid,
        results: Vec<ChangeResult>,
    },
    CatchUp {
        deltas: Vec<Delta>,
        seq: u64,
        head_seq: u64,
    },
    UpToDate { seq: u64 },
    Delta { deltas: Vec<Delta>, seq: u64 },
    MustResync {
        epoch: String,
        head_seq: u64,
        reason: ErrorCode,
    },
    SnapshotPage {
        id: RequestId,
        table: String,
        rows: Vec<SnapshotRow>,
        seq: u64,
        epoch: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_after: Option<Object>,
    },
    AuthOk { id: RequestId, expires_at: u64 },
    Pong { id: RequestId },
    Subscribed { id: RequestId, sub: String, seq: u64 },
    SubRows { sub: String, rows: Vec<SnapshotRow>, seq: u64, last: bool },
    SubDelta { sub: String, deltas: Vec<Delta>, seq: u64 },
    Presence { sub: String, online: Vec<PresenceEntry> },
    PresenceDiff { sub: String, joins: Vec<PresenceEntry>, leaves: Vec<PresenceEntry> },
    Conflict { sub: String, event: ConflictEvent, conflict: Box<ConflictRecord>, open: u64 },
    Unsubscribed { id: RequestId, sub: String },
    Broadcast {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        event: Option<String>,
        payload: Value,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
        temporary: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// A frame type with a type-first decoding.
pub(crate) trait TypeFirst: Sized {
    fn from_fields<'de, A: MapAccess<'de>>(tag: String, fields: A) -> Result<Self, A::Error>;
}

impl TypeFirst for ClientFrame {
    fn from_fields<'de, A: MapAccess<'de>>(tag: String, fields: A) -> Result<Self, A::Error> {
        ClientFrameTypeFirst::deserialize(TagThenFields { tag, fields })
    }
}

impl TypeFirst for ServerFrame {
    fn from_fields<'de, A: MapAccess<'de>>(tag: String, fields: A) -> Result<Self, A::Error> {
        ServerFrameTypeFirst::deserialize(TagThenFields { tag, fields })
    }
}

/// Visits a frame's map: `Some(frame)` when `type` is its first key, `None` (the rest skipped)
/// when it is not.
pub(crate) struct TypeFirstVisitor<T>(pub(crate) PhantomData<T>);

impl<'de, T: TypeFirst> Visitor<'de> for TypeFirstVisitor<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a frame: a map with a `type`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        match map.next_key::<IsType>()? {
            Some(IsType(true)) => {}
            Some(IsType(false)) => {
                map.next_value::<IgnoredAny>()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(None);
            }
            None => return Ok(None),
        }
        let tag: String = map.next_value()?;
        T::from_fields(tag, map).map(Some)
    }
}

/// Whether a key is `type`, read without allocating.
#[derive(PartialEq)]
struct IsType(bool);

impl<'de> Deserialize<'de> for IsType {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = IsType;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<IsType, E> {
                Ok(IsType(key == "type"))
            }
            fn visit_bytes<E: de::Error>(self, key: &[u8]) -> Result<IsType, E> {
                Ok(IsType(key == b"type"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// The tag already read and the map's remaining entries, seen as an externally tagged enum.
struct TagThenFields<A> {
    tag: String,
    fields: A,
}

impl<'de, A: MapAccess<'de>> de::Deserializer<'de> for TagThenFields<A> {
    type Error = A::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de, A: MapAccess<'de>> EnumAccess<'de> for TagThenFields<A> {
    type Error = A::Error;
    type Variant = Fields<A>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Fields<A>), A::Error> {
        let variant = seed.deserialize(self.tag.into_deserializer())?;
        Ok((variant, Fields(self.fields)))
    }
}

struct Fields<A>(A);

impl<'de, A: MapAccess<'de>> VariantAccess<'de> for Fields<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        Err(de::Error::custom("frames are maps of fields"))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _seed: T) -> Result<T::Value, A::Error> {
        Err(de::Error::custom("frames are maps of fields"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _visitor: V) -> Result<V::Value, A::Error> {
        Err(de::Error::custom("frames are maps of fields"))
    }

    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, A::Error> {
        visitor.visit_map(self.0)
    }
}
