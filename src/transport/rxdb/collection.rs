//! An RxDB collection as one of the hub's synced tables, and its documents as rows: which
//! table and columns a collection is, and the translation both ways. A document is the row
//! without the tenant column (and columns the collection does not expose), plus `_deleted`;
//! a column holding null is left out of the document, as an optional field the client never
//! set is absent rather than null. Pure code over the catalog's table schema.

use std::sync::Arc;

use protocol::{Object, Op};
use serde_json::Value;

use crate::config::{Config, RxdbConflicts, RxdbNulls};
use crate::sync::conditional::WriteCondition;
use crate::storage::catalog::{Catalog, TableSchema};

/// The field RxDB marks tombstones with.
pub const DELETED: &str = "_deleted";

#[derive(Debug)]
pub struct Collection {
    pub name: String,
    pub table: Arc<TableSchema>,
    /// Columns a document holds, key columns included, the tenant column never.
    pub fields: Arc<[String]>,
    /// Columns a conditional write compares: the fields without the key.
    pub compared: Arc<[String]>,
    pub conflicts: RxdbConflicts,
    /// Null columns are written as `null` rather than left out.
    pub keep_nulls: bool,
}

/// Why a collection cannot be served (told to the operator in the log, counted in metrics).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionProblem {
    #[error("no synced table `{0}` (register it, or map the collection in rxdb_collections)")]
    NoTable(String),
    #[error("rxdb_collections names column `{column}`, which table `{table}` does not have")]
    NoColumn { table: String, column: String },
    #[error("rxdb_collections must list the key column `{0}` among the fields")]
    KeyNotExposed(String),
}

/// Why a document cannot be written, for good (answered as a conflict with the hub's document).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentProblem {
    #[error("the document has no value for its key column `{0}`")]
    NoKey(String),
    #[error("the document holds `{0}`, which the collection does not have")]
    UnknownField(String),
    #[error("`_deleted` is not a boolean")]
    DeletedNotBoolean,
}

/// A document as a change of its row: key, upsert or delete, and the fields written.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentWrite {
    pub key: Object,
    pub op: Op,
    pub fields: Object,
}

impl Collection {
    /// The collection `name` as configured (`rxdb_collections`), else the synced table of
    /// the same name with every column but the tenant column.
    pub fn resolve(name: &str, config: &Config, catalog: &Catalog) -> Result<Collection, CollectionProblem> {
        let entry = config.rxdb_collections.iter().find(|c| c.name == name);
        let table_name = entry.and_then(|c| c.table.as_deref()).unwrap_or(name);
        let table = catalog.get(table_name).cloned().ok_or_else(|| CollectionProblem::NoTable(table_name.to_owned()))?;
        let fields: Vec<String> = match entry.and_then(|c| c.fields.as_ref()) {
            Some(listed) => {
                if let Some(missing) = listed.iter().find(|c| !table.columns.contains_key(*c) || **c == table.tenant_column) {
                    return Err(CollectionProblem::NoColumn { table: table.name.clone(), column: missing.clone() });
                }
                if let Some(key) = table.key.iter().find(|k| !listed.contains(k)) {
                    return Err(CollectionProblem::KeyNotExposed(key.clone()));
                }
                listed.clone()
            }
            None => table.columns.keys().filter(|c| **c != table.tenant_column).cloned().collect(),
        };
        let compared = fields.iter().filter(|f| !table.key.contains(f)).cloned().collect();
        Ok(Collection {
            name: name.to_owned(),
            conflicts: entry.map(|c| c.conflicts).unwrap_or_default(),
            keep_nulls: entry.is_some_and(|c| c.nulls == RxdbNulls::Keep),
            table,
            fields: fields.into(),
            compared,
        })
    }

    /// The document of a row (a tombstone when `deleted`).
    pub fn document(&self, row: &Object, deleted: bool) -> Object {
        let mut doc: Object = self
            .fields
            .iter()
            .filter_map(|f| match row.get(f) {
                Some(Value::Null) | None if self.keep_nulls => Some((f.clone(), Value::Null)),
                Some(v) if !v.is_null() => Some((f.clone(), v.clone())),
                _ => None,
            })
            .collect();
        doc.insert(DELETED.into(), Value::Bool(deleted));
        doc
    }

    /// A tombstone standing for a document the hub refused to create: the client's own values,
    /// deleted, so that its conflict handler drops the document.
    pub fn refusal_tombstone(&self, doc: &Object) -> Object {
        let mut tombstone = self.document(doc, true);
        tombstone.insert(DELETED.into(), Value::Bool(true));
        tombstone
    }

    /// Whether the document is a tombstone; `None` when `_deleted` is not a boolean.
    fn deleted(doc: &Object) -> Option<bool> {
        match doc.get(DELETED) {
            None | Some(Value::Null) => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => None,
        }
    }

    /// The key of a document.
    pub fn key_of(&self, doc: &Object) -> Result<Object, DocumentProblem> {
        self.table
            .key
            .iter()
            .map(|k| match doc.get(k) {
                Some(v) if !v.is_null() => Ok((k.clone(), v.clone())),
                _ => Err(DocumentProblem::NoKey(k.clone())),
            })
            .collect()
    }

    /// The change that makes the stored document `doc`. Every field the collection has is
    /// written (an absent one as null: the document replaces the whole row), unless `since`
    /// is given: then only the fields that differ from it (what the client changed, for the
    /// hub to merge).
    pub fn write_of(&self, doc: &Object, since: Option<&Object>) -> Result<DocumentWrite, DocumentProblem> {
        if let Some(unknown) = doc.keys().find(|k| !k.starts_with('_') && !self.fields.contains(k)) {
            return Err(DocumentProblem::UnknownField(unknown.clone()));
        }
        let key = self.key_of(doc)?;
        let deleted = Self::deleted(doc).ok_or(DocumentProblem::DeletedNotBoolean)?;
        if deleted {
            return Ok(DocumentWrite { key, op: Op::Delete, fields: Object::new() });
        }
        let value = |d: &Object, f: &str| d.get(f).cloned().unwrap_or(Value::Null);
        let fields = self
            .compared
            .iter()
            .filter(|f| since.is_none_or(|s| value(s, f) != value(doc, f)))
            .map(|f| (f.clone(), value(doc, f)))
            .collect();
        Ok(DocumentWrite { key, op: Op::Upsert, fields })
    }

    /// RxDB's write rule as a condition on the stored row: write only if it is the document
    /// the client assumed (none, when it assumed none); or, for a collection the hub merges,
    /// what the client is known to have seen of the row.
    pub fn condition(&self, assumed: Option<&Object>) -> WriteCondition {
        WriteCondition {
            merge: self.conflicts == RxdbConflicts::ServerMerge,
            assumed_deleted: assumed.is_some_and(|a| Self::deleted(a).unwrap_or(false)),
            assumed: assumed.map(|a| a.iter().filter(|(k, _)| !k.starts_with('_')).map(|(k, v)| (k.clone(), v.clone())).collect()),
            compared: self.compared.clone(),
            refuse: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MergePolicy, RxdbCollectionConfig};
    use crate::storage::catalog::Column;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn catalog() -> Catalog {
        let columns = [("tenant_id", "text"), ("id", "uuid"), ("name", "text"), ("price", "numeric(10,2)"), ("note", "text")]
            .into_iter()
            .map(|(name, ty)| (name.to_owned(), Column { name: name.to_owned(), sql_type: ty.to_owned() }))
            .collect();
        let products = TableSchema::assemble("products".into(), "tenant_id".into(), "text".into(), vec!["id".into()], columns, MergePolicy::Lww, "to_jsonb");
        Catalog::of(vec![products])
    }

    #[test]
    fn a_collection_is_its_tables_columns_but_the_tenants() {
        let c = Collection::resolve("products", &Config::default(), &catalog()).unwrap();
        assert_eq!(&*c.fields, &["id", "name", "note", "price"]);
        assert_eq!(&*c.compared, &["name", "note", "price"]);
        assert_eq!(Collection::resolve("todos", &Config::default(), &catalog()).unwrap_err(), CollectionProblem::NoTable("todos".into()));
    }

    #[test]
    fn configured_collections_map_tables_and_fields() {
        let mut config = Config::default();
        let entry = |fields: Vec<&str>| RxdbCollectionConfig {
            name: "items".into(),
            table: Some("products".into()),
            fields: Some(fields.into_iter().map(String::from).collect()),
            conflicts: RxdbConflicts::ServerMerge,
            nulls: RxdbNulls::Keep,
        };
        config.rxdb_collections = vec![entry(vec!["id", "name"])];
        let c = Collection::resolve("items", &config, &catalog()).unwrap();
        assert_eq!(&*c.fields, &["id", "name"]);
        assert_eq!(c.conflicts, RxdbConflicts::ServerMerge);
        let row = obj(json!({"tenant_id": "t1", "id": "a", "name": null}));
        assert_eq!(c.document(&row, false), obj(json!({"id": "a", "name": null, "_deleted": false})), "nulls kept");
        config.rxdb_collections = vec![entry(vec!["name"])];
        assert_eq!(Collection::resolve("items", &config, &catalog()).unwrap_err(), CollectionProblem::KeyNotExposed("id".into()));
        config.rxdb_collections = vec![entry(vec!["id", "tenant_id"])];
        assert!(matches!(Collection::resolve("items", &config, &catalog()), Err(CollectionProblem::NoColumn { .. })));
    }

    #[test]
    fn documents_leave_out_the_tenant_and_nulls_and_say_whether_deleted() {
        let c = Collection::resolve("products", &Config::default(), &catalog()).unwrap();
        let row = obj(json!({"tenant_id": "t1", "id": "a", "name": "Tea", "price": 1.5, "note": null}));
        assert_eq!(c.document(&row, false), obj(json!({"id": "a", "name": "Tea", "price": 1.5, "_deleted": false})));
        assert_eq!(c.document(&row, true)["_deleted"], json!(true));
    }

    #[test]
    fn a_document_writes_every_field_or_what_changed_since_the_assumed_one() {
        let c = Collection::resolve("products", &Config::default(), &catalog()).unwrap();
        let doc = obj(json!({"id": "a", "name": "Tea", "price": 2, "_deleted": false, "_meta": {"lwt": 1}}));
        let whole = c.write_of(&doc, None).unwrap();
        assert_eq!(whole.key, obj(json!({"id": "a"})));
        assert_eq!(whole.op, Op::Upsert);
        assert_eq!(whole.fields, obj(json!({"name": "Tea", "price": 2, "note": null})));
        let before = obj(json!({"id": "a", "name": "Tea", "price": 1, "_deleted": false}));
        assert_eq!(c.write_of(&doc, Some(&before)).unwrap().fields, obj(json!({"price": 2})));
        let gone = obj(json!({"id": "a", "name": "Tea", "_deleted": true}));
        assert_eq!(c.write_of(&gone, None).unwrap().op, Op::Delete);
    }

    #[test]
    fn documents_that_cannot_be_rows_are_refused() {
        let c = Collection::resolve("products", &Config::default(), &catalog()).unwrap();
        assert_eq!(c.write_of(&obj(json!({"name": "x"})), None), Err(DocumentProblem::NoKey("id".into())));
        assert_eq!(c.write_of(&obj(json!({"id": null})), None), Err(DocumentProblem::NoKey("id".into())));
        assert_eq!(c.write_of(&obj(json!({"id": "a", "colour": "red"})), None), Err(DocumentProblem::UnknownField("colour".into())));
        assert_eq!(c.write_of(&obj(json!({"id": "a", "_deleted": "yes"})), None), Err(DocumentProblem::DeletedNotBoolean));
    }

    #[test]
    fn the_condition_is_the_assumed_document_without_rxdb_fields() {
        let c = Collection::resolve("products", &Config::default(), &catalog()).unwrap();
        let assumed = obj(json!({"id": "a", "name": "Tea", "_deleted": true, "_rev": "1-x"}));
        let condition = c.condition(Some(&assumed));
        assert!(condition.assumed_deleted);
        assert_eq!(condition.assumed, Some(obj(json!({"id": "a", "name": "Tea"}))));
        assert_eq!(&*condition.compared, &["name", "note", "price"]);
        let none = c.condition(None);
        assert_eq!((none.assumed, none.assumed_deleted), (None, false));
    }
}
