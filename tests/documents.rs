//! Reads of a table as documents against real Postgres: changes after a seq, each row once at
//! its latest change and in that change's order, tombstones with their last values, only the
//! table's and the tenant's rows, a reader's row restriction and hidden columns, a trimmed log;
//! and snapshots, page by page over the rows and then the tombstones.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::*;
use protocol::{Change, ChangeStatus, ErrorCode};
use serde_json::{json, Value};
use synchub::auth::Identity;
use synchub::error::Error;
use synchub::ids::{DeviceId, Seq, TenantId, UserId};
use synchub::rules::{Access, AccessView, RuleConfig, Rules};
use synchub::storage::apply::{ApplyLimits, BatchInput, GroupOutput};
use synchub::storage::catalog::TableSchema;
use synchub::storage::documents::{DocumentPage, SnapshotCursor, SnapshotPhase, StoredDocument};
use synchub::storage::row_cache::RowCache;
use synchub::storage::Store;
use uuid::Uuid;

const TENANT: &str = "docs-1";
const OTHER: &str = "docs-2";

struct Docs {
    hub: TestHub,
    store: Arc<Store>,
}

impl Docs {
    async fn start() -> Docs {
        let hub = TestHub::start().await;
        let store = hub.running.as_ref().unwrap().hub.store.clone();
        Docs { hub, store }
    }

    fn table(&self, name: &str) -> Arc<TableSchema> {
        self.store.catalog().get(name).unwrap().clone()
    }

    /// Commit `changes` for `tenant` as one batch of device `pos-1`, straight through the store.
    async fn commit(&self, tenant: &str, changes: Vec<Change>) -> GroupOutput {
        let tenant = TenantId::new(tenant);
        self.store.tenant_head(&tenant).await.unwrap();
        // The hub numbers the device's changes, tenant by tenant.
        let batch = BatchInput { assign_device_seqs: true, ..BatchInput::pushed(DeviceId::new("pos-1"), UserId::new("user-1"), Uuid::now_v7(), changes) };
        let limits = ApplyLimits { max_field_bytes: 65_536, max_key_bytes: 1024, max_clock_skew_ms: 300_000 };
        let mut conn = self.store.group_connection().await.unwrap();
        let out = self.store.commit_group(&mut conn, &tenant, &[batch], limits, None, &mut RowCache::off()).await.unwrap();
        for r in &out.results[0] {
            assert!(matches!(r.status, ChangeStatus::Applied | ChangeStatus::Merged), "{r:?}");
        }
        out
    }

    /// Insert products for the tenant, one change each; returns their ids.
    async fn products(&self, tenant: &str, names: &[&str]) -> Vec<Uuid> {
        let ids: Vec<Uuid> = names.iter().map(|_| Uuid::now_v7()).collect();
        let changes = ids.iter().zip(names).map(|(id, name)| upsert("products", json!({"id": id}), product(*id, name, 100), 0, now_ms(), 0)).collect();
        self.commit(tenant, changes).await;
        ids
    }

    async fn rename(&self, id: Uuid, name: &str) -> Seq {
        let out = self.commit(TENANT, vec![upsert("products", json!({"id": id}), json!({"name": name}), 0, now_ms(), 0)]).await;
        out.results[0][0].seq.unwrap()
    }

    async fn remove(&self, table: &str, key: Value) -> Seq {
        let out = self.commit(TENANT, vec![delete(table, key, 0, now_ms(), 0)]).await;
        out.results[0][0].seq.unwrap()
    }

    async fn changed(&self, table: &str, after: Seq, limit: u32, access: Option<&AccessView>) -> DocumentPage {
        self.store.changed_documents(&TenantId::new(TENANT), &self.table(table), after, limit, access).await.expect("changed documents")
    }

    async fn snapshot(&self, table: &str, after: Option<&SnapshotCursor>, limit: u32, access: Option<&AccessView>) -> (DocumentPage, Option<SnapshotCursor>) {
        self.store.document_snapshot(&TenantId::new(TENANT), &self.table(table), after, limit, access).await.expect("snapshot page")
    }

    /// Every page of a snapshot; the cursors went through JSON, as in a checkpoint.
    async fn whole_snapshot(&self, table: &str, limit: u32, access: Option<&AccessView>) -> (Vec<DocumentPage>, Vec<Option<SnapshotCursor>>) {
        self.rest_of_snapshot(table, None, limit, access).await
    }

    /// The pages of a snapshot from `cursor` on.
    async fn rest_of_snapshot(
        &self,
        table: &str,
        mut cursor: Option<SnapshotCursor>,
        limit: u32,
        access: Option<&AccessView>,
    ) -> (Vec<DocumentPage>, Vec<Option<SnapshotCursor>>) {
        let (mut pages, mut cursors) = (Vec::new(), Vec::new());
        loop {
            let (page, next) = self.snapshot(table, cursor.as_ref(), limit, access).await;
            pages.push(page);
            cursors.push(next.clone());
            match next {
                Some(next) => cursor = Some(serde_json::from_value(serde_json::to_value(&next).unwrap()).unwrap()),
                None => return (pages, cursors),
            }
        }
    }

    async fn head(&self) -> Seq {
        self.store.tenant_head(&TenantId::new(TENANT)).await.unwrap().head_seq
    }
}

fn id_of(doc: &StoredDocument) -> Uuid {
    doc.key["id"].as_str().unwrap().parse().unwrap()
}

fn ids(docs: &[StoredDocument]) -> Vec<Uuid> {
    docs.iter().map(id_of).collect()
}

fn refused(result: Result<impl std::fmt::Debug, Error>) -> ErrorCode {
    result.expect_err("refused").code()
}

#[actix_web::test]
async fn changes_come_once_per_row_at_its_latest_change_in_pages() {
    let docs = Docs::start().await;
    let p = docs.products(TENANT, &["p0", "p1", "p2", "p3", "p4", "p5"]).await;
    // p1 three times, p4 once; meanwhile another table and another tenant.
    for name in ["p1 b", "p1 c", "p1 d"] {
        docs.rename(p[1], name).await;
    }
    let p4_seq = docs.rename(p[4], "p4 b").await;
    let customer = Uuid::now_v7();
    docs.commit(TENANT, vec![upsert("customers", json!({"id": customer}), json!({"name": "Ann"}), 0, now_ms(), 0)]).await;
    docs.products(OTHER, &["elsewhere"]).await;
    let head = docs.head().await;

    let first = docs.changed("products", 0, 4, None).await;
    assert_eq!(ids(&first.docs), [p[0], p[2], p[3], p[5]], "seq order of each row's latest change");
    assert_eq!(first.docs.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 3, 4, 6]);
    assert_eq!((first.head_seq, first.log_floor), (head, 0));
    assert!(!first.epoch.is_empty());
    let second = docs.changed("products", first.docs[3].seq, 4, None).await;
    assert_eq!(ids(&second.docs), [p[1], p[4]]);
    assert_eq!((second.docs[0].row["name"].clone(), second.docs[0].seq), (json!("p1 d"), 9));
    assert_eq!(second.docs[1].seq, p4_seq);
    assert!(second.docs.iter().all(|d| !d.deleted && d.row["tenant_id"] == json!(TENANT)));
    // From the middle of p1's changes: it comes once, at its latest.
    assert_eq!(ids(&docs.changed("products", 8, 4, None).await.docs), [p[1], p[4]]);
    assert!(docs.changed("products", p4_seq, 4, None).await.docs.is_empty(), "the customer is another table's");
    assert_eq!(ids(&docs.changed("customers", 0, 4, None).await.docs), [customer]);

    // Deletes: tombstones with the row's last values, whoever deleted it.
    let deleted_at = docs.remove("products", json!({"id": p[2]})).await;
    sqlx::query("delete from products where tenant_id = $1 and id = $2").bind(TENANT).bind(p[3]).execute(&docs.hub.db).await.unwrap();
    let page = docs.changed("products", p4_seq, 10, None).await;
    assert_eq!(ids(&page.docs), [p[2], p[3]]);
    assert_eq!(page.docs[0].seq, deleted_at);
    for (doc, name) in page.docs.iter().zip(["p2", "p3"]) {
        assert!(doc.deleted);
        assert_eq!((&doc.row["name"], &doc.row["price_cents"]), (&json!(name), &json!(100)), "last values");
    }
    docs.hub.shutdown().await;
}

fn employee_view(employee: &str) -> Arc<AccessView> {
    let rules = Rules::from_config(&[RuleConfig {
        table: "orders".into(),
        role: "Employee".into(),
        access: Access::Read,
        row_column: Some("employee_id".into()),
        row_claim: None,
        hidden_columns: vec!["total_cents".into()],
    }])
    .unwrap();
    let identity = Identity {
        tenant: TenantId::new(TENANT),
        user: UserId::new(employee),
        role: "Employee".into(),
        device: None,
        expires_at: u64::MAX,
        claims: Arc::new(json!({"sub": employee, "role": "Employee"})),
    };
    rules.view_for(&identity).expect("a restricted view")
}

fn order(employee: &str, total: i64) -> Value {
    json!({"store_id": "s1", "employee_id": employee, "total_cents": total})
}

#[actix_web::test]
async fn a_readers_row_restriction_and_hidden_columns_hold() {
    let docs = Docs::start().await;
    let view = employee_view("emp-1");
    let o: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let new_order = |id: Uuid, employee: &str| upsert("orders", json!({"id": id}), order(employee, 500), 0, now_ms(), 0);
    docs.commit(TENANT, vec![new_order(o[0], "emp-1"), new_order(o[1], "emp-2"), new_order(o[2], "emp-1"), new_order(o[3], "emp-1")]).await;
    let page = docs.changed("orders", 0, 10, Some(&view)).await;
    assert_eq!(ids(&page.docs), [o[0], o[2], o[3]]);
    assert!(page.docs.iter().all(|d| !d.deleted && !d.row.contains_key("total_cents") && d.row["employee_id"] == json!("emp-1")));
    let head = page.head_seq;

    // o2 moves to emp-2, o0 and o1 are deleted: emp-1 sees o2 leave and o0 go, not o1.
    docs.commit(TENANT, vec![upsert("orders", json!({"id": o[2]}), json!({"employee_id": "emp-2"}), 0, now_ms(), 0)]).await;
    docs.remove("orders", json!({"id": o[0]})).await;
    docs.remove("orders", json!({"id": o[1]})).await;
    let page = docs.changed("orders", head, 10, Some(&view)).await;
    assert_eq!(ids(&page.docs), [o[2], o[0]]);
    assert!(page.docs.iter().all(|d| d.deleted && d.row["employee_id"] == json!("emp-1") && !d.row.contains_key("total_cents")), "{:?}", page.docs);
    // Unrestricted, all three changes, o2 live.
    let all = docs.changed("orders", head, 10, None).await;
    assert_eq!(all.docs.iter().map(|d| (id_of(d), d.deleted)).collect::<Vec<_>>(), [(o[2], false), (o[0], true), (o[1], true)]);

    // The snapshot: emp-1's live row, then emp-1's tombstone.
    let (pages, _) = docs.whole_snapshot("orders", 10, Some(&view)).await;
    let seen: Vec<(Uuid, bool)> = pages.iter().flat_map(|p| &p.docs).map(|d| (id_of(d), d.deleted)).collect();
    assert_eq!(seen, [(o[3], false), (o[0], true)]);
    assert!(pages.iter().flat_map(|p| &p.docs).all(|d| !d.row.contains_key("total_cents")));

    // A table the reader may not read.
    let products = docs.table("products");
    assert_eq!(refused(docs.store.changed_documents(&TenantId::new(TENANT), &products, 0, 10, Some(&view)).await), ErrorCode::Forbidden);
    assert_eq!(refused(docs.store.document_snapshot(&TenantId::new(TENANT), &products, None, 10, Some(&view)).await), ErrorCode::Forbidden);
    docs.hub.shutdown().await;
}

#[actix_web::test]
async fn a_trimmed_log_sends_readers_to_a_snapshot() {
    let docs = Docs::start().await;
    let p = docs.products(TENANT, &["kept", "gone"]).await; // 1, 2
    docs.remove("products", json!({"id": p[1]})).await; // 3
    docs.rename(p[0], "kept b").await; // 4
    let trimmed: i64 = sqlx::query_scalar("select synchub.trim_log($1, 3)").bind(TENANT).fetch_one(&docs.hub.db).await.unwrap();
    assert_eq!(trimmed, 3);

    let tenant = TenantId::new(TENANT);
    let products = docs.table("products");
    assert_eq!(refused(docs.store.changed_documents(&tenant, &products, 2, 10, None).await), ErrorCode::PositionTooOld);
    let page = docs.changed("products", 3, 10, None).await;
    assert_eq!((ids(&page.docs), page.log_floor), (vec![p[0]], 3));

    // The snapshot has the live row and the tombstone, whose values the trim kept with it.
    let (pages, _) = docs.whole_snapshot("products", 10, None).await;
    let all: Vec<&StoredDocument> = pages.iter().flat_map(|p| &p.docs).collect();
    assert_eq!(all.iter().map(|d| (id_of(d), d.deleted)).collect::<Vec<_>>(), [(p[0], false), (p[1], true)]);
    assert_eq!(all[0].row["name"], json!("kept b"));
    assert_eq!(all[1].row["name"], json!("gone"), "the deleted row's values outlive the log entry");
    assert_eq!(all[1].row["id"], json!(p[1]));
    assert_eq!(pages[0].head_seq, 4);
    docs.hub.shutdown().await;
}

#[actix_web::test]
async fn snapshots_page_over_rows_then_tombstones() {
    let docs = Docs::start().await;
    let p = docs.products(TENANT, &["a", "b", "c", "d", "e", "f", "g", "h"]).await;
    for id in &p[5..] {
        docs.remove("products", json!({"id": id})).await;
    }
    // A timestamp written in JavaScript's notation comes back so.
    let stamped = "2026-01-01T10:00:00.000Z";
    docs.commit(TENANT, vec![upsert("products", json!({"id": p[0]}), json!({"updated_at": stamped}), 0, now_ms(), 0)]).await;
    docs.products(OTHER, &["elsewhere"]).await;
    let since = docs.head().await;

    let (first, cursor) = docs.snapshot("products", None, 3, None).await;
    let cursor = cursor.expect("more pages");
    assert_eq!((cursor.phase, cursor.since, first.head_seq), (SnapshotPhase::Rows, since, since));
    // A write between pages: later pages keep the snapshot's head; the change is read after.
    let renamed_at = docs.rename(p[1], "b2").await;
    let (mut pages, mut cursors) = docs.rest_of_snapshot("products", Some(cursor.clone()), 3, None).await;
    pages.insert(0, first);
    cursors.insert(0, Some(cursor));
    let sizes: Vec<usize> = pages.iter().map(|p| p.docs.len()).collect();
    assert_eq!(sizes, [3, 3, 2], "5 rows, 3 tombstones");
    assert_eq!(cursors.iter().map(|c| c.as_ref().map(|c| c.phase)).collect::<Vec<_>>(), [Some(SnapshotPhase::Rows), Some(SnapshotPhase::Tombstones), None]);
    assert!(pages.iter().all(|p| p.head_seq == since) && cursors.iter().flatten().all(|c| c.since == since));
    let all: Vec<&StoredDocument> = pages.iter().flat_map(|p| &p.docs).collect();
    let live: Vec<Uuid> = all.iter().filter(|d| !d.deleted).map(|d| id_of(d)).collect();
    let dead: BTreeSet<Uuid> = all.iter().filter(|d| d.deleted).map(|d| id_of(d)).collect();
    let in_key_order: Vec<Uuid> =
        sqlx::query_scalar("select id from products where tenant_id = $1 order by id").bind(TENANT).fetch_all(&docs.hub.db).await.unwrap();
    assert_eq!(live, in_key_order);
    assert_eq!(live.iter().copied().collect::<BTreeSet<_>>(), p[..5].iter().copied().collect());
    assert_eq!(dead, p[5..].iter().copied().collect());
    assert!(all.iter().filter(|d| d.deleted).all(|d| d.row["price_cents"] == json!(100)), "tombstones with their last values");
    let first_row = all.iter().find(|d| id_of(d) == p[0]).unwrap();
    assert_eq!(first_row.row["updated_at"], json!(stamped));
    let db_rendering: Value = sqlx::query_scalar("select to_jsonb(updated_at) from products where id = $1").bind(p[0]).fetch_one(&docs.hub.db).await.unwrap();
    assert_ne!(db_rendering, json!(stamped));
    assert!(all.iter().all(|d| d.seq == 0 && d.row["tenant_id"] == json!(TENANT)));
    assert!(all.windows(2).all(|w| !w[0].deleted || w[1].deleted), "rows, then tombstones");
    let page = docs.changed("products", since, 10, None).await;
    assert_eq!((ids(&page.docs), page.docs[0].seq), (vec![p[1]], renamed_at));

    // Another epoch (the tenant's log began anew) or a trim past the snapshot's head: start over.
    let tenant = TenantId::new(TENANT);
    let products = docs.table("products");
    let (_, cursor) = docs.snapshot("products", None, 3, None).await;
    let cursor = cursor.unwrap();
    let stale_epoch = SnapshotCursor { epoch: "another".into(), ..cursor.clone() };
    assert_eq!(refused(docs.store.document_snapshot(&tenant, &products, Some(&stale_epoch), 3, None).await), ErrorCode::PositionTooOld);
    let later = docs.rename(p[2], "c2").await;
    assert!(later > cursor.since);
    sqlx::query("select synchub.trim_log($1, $2)").bind(TENANT).bind(later as i64).execute(&docs.hub.db).await.unwrap();
    assert_eq!(refused(docs.store.document_snapshot(&tenant, &products, Some(&cursor), 3, None).await), ErrorCode::PositionTooOld);
    docs.hub.shutdown().await;
}

#[actix_web::test]
async fn an_empty_table_and_an_unknown_tenant_read_as_nothing() {
    let docs = Docs::start().await;
    let page = docs.changed("products", 0, 10, None).await;
    assert!(page.docs.is_empty());
    let (page, next) = docs.snapshot("products", None, 10, None).await;
    assert!(page.docs.is_empty() && next.is_none());
    docs.hub.shutdown().await;
}
