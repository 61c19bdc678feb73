//! The rows a tenant's group commits last read and wrote, kept between groups so that the next
//! group need not read them back from Postgres.
//!
//! Every write to a synced row that is not the hub's own (another SQL client's, through the
//! capture trigger) moves the tenant's head in the same transaction. So while the head is
//! where this cache's last group left it, the cached rows, versions and clocks are the ones in
//! Postgres. A group that merges from the cache checks the head in its bookkeeping statement
//! and is redone from rows read under lock when it moved (see `storage::apply`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use protocol::Object;

use super::catalog::TableSchema;
use super::clocks;
use crate::ids::Seq;
use crate::sync::merge::{FieldClock, RowState};

/// One row as a group left it, with the table description it was merged under: a reloaded
/// catalog (a column added, say) makes it miss.
pub(super) struct CachedRow {
    pub table: Arc<TableSchema>,
    /// The row's primary key as Postgres renders it.
    pub key: Object,
    pub state: RowState,
}

/// A row as the cache holds it: values and field clocks as JSON text, read back when a group
/// takes the row. As maps of their own (a tree node per map, an allocation per name, value,
/// device and user) a row of six short columns held about 3.3 KiB; as text it holds what its
/// values and clocks take to write down. The key is the text the row is held under.
struct StoredRow {
    table: Arc<TableSchema>,
    /// `None` when the row does not exist (never did, or deleted).
    values: Option<Box<str>>,
    version: u64,
    /// As `row_versions.clocks` has them (`storage::clocks`).
    clocks: Box<str>,
    /// Rare: only tombstones have it.
    deleted: Option<Box<FieldClock>>,
}

impl StoredRow {
    fn of(row: CachedRow) -> Option<StoredRow> {
        let state = row.state;
        Some(StoredRow {
            table: row.table,
            values: match &state.values {
                Some(values) => Some(serde_json::to_string(values).ok()?.into_boxed_str()),
                None => None,
            },
            version: state.version,
            // Writers by name: the cache needs no numbers to read them back.
            clocks: clocks::encode(&state.clocks, |version| version, |_| None).into_boxed_str(),
            deleted: state.deleted.map(Box::new),
        })
    }

    /// The row as a group merges into it; `key` is the text it was held under.
    fn restore(self, key: &str) -> Option<CachedRow> {
        let clocks = clocks::decode(&self.clocks, |_| None).ok()?;
        let values = match &self.values {
            Some(text) => Some(serde_json::from_str(text).ok()?),
            None => None,
        };
        let state = RowState { values, version: self.version, clocks, deleted: self.deleted.map(|clock| *clock) };
        Some(CachedRow { table: self.table, key: serde_json::from_str(key).ok()?, state })
    }
}

/// Rows held by every tenant's cache together, bounded (config `row_cache_total_rows`).
#[derive(Clone)]
pub struct RowBudget {
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl RowBudget {
    pub fn new(limit: usize) -> RowBudget {
        RowBudget { held: Arc::new(AtomicUsize::new(0)), limit }
    }

    /// Rows held now, over all tenants.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Take up to `wanted` rows of what is left; returns how many were granted.
    fn reserve(&self, wanted: usize) -> usize {
        let mut granted = 0;
        // fetch_update retries on a race; the closure only computes.
        let _ = self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            granted = wanted.min(self.limit.saturating_sub(held));
            Some(held + granted)
        });
        granted
    }

    fn release(&self, rows: usize) {
        if rows > 0 {
            self.held.fetch_sub(rows, Ordering::Relaxed);
        }
    }
}

/// Rows of one tenant, bounded in count, and counted against the hub's [`RowBudget`].
pub struct RowCache {
    /// Most rows held; 0 keeps none.
    limit: usize,
    budget: RowBudget,
    /// The tenant head as of which the rows are current; `None`: nothing is.
    head: Option<Seq>,
    /// Table → key as Postgres renders it (JSON text) → row.
    rows: HashMap<String, HashMap<Box<str>, StoredRow>>,
    /// Rows in `rows`, over all tables.
    held: usize,
    /// Table → key as a device pushed it → key as Postgres renders it, for keys a device
    /// writes otherwise (a UUID's case); a key pushed as Postgres renders it needs none.
    aliases: HashMap<String, HashMap<Box<str>, Box<str>>>,
    /// Keys in `aliases`, over all tables.
    aliases_held: usize,
}

impl RowCache {
    pub fn new(limit: usize, budget: RowBudget) -> RowCache {
        RowCache { limit, budget, head: None, rows: HashMap::new(), held: 0, aliases: HashMap::new(), aliases_held: 0 }
    }

    /// A cache that holds nothing.
    pub fn off() -> RowCache {
        RowCache::new(0, RowBudget::new(0))
    }

    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    pub fn clear(&mut self) {
        self.head = None;
        self.drop_rows();
    }

    fn drop_rows(&mut self) {
        self.budget.release(self.held);
        self.held = 0;
        self.aliases_held = 0;
        // Dropped, not cleared: an emptied map keeps its capacity.
        self.rows = HashMap::new();
        self.aliases = HashMap::new();
    }

    /// Whether the rows may be used by a group that expects the tenant's head at `head`;
    /// when not, they are dropped.
    pub(super) fn usable_at(&mut self, head: Option<Seq>) -> bool {
        if self.limit > 0 && head.is_some() && self.head == head {
            return true;
        }
        self.clear();
        false
    }

    /// Another writer's changes `from + 1 ..= to` (another node's commit, another SQL
    /// client's write), each named by its table and key as Postgres renders it (JSON text):
    /// when the rows are current as of `from`, the rows those changes wrote are dropped and the
    /// rest is current as of `to`. Otherwise nothing changes (and the rows are not usable at
    /// `to`). Returns whether the rows are now current as of `to`.
    pub fn advance<'a>(&mut self, from: Seq, to: Seq, written: impl Iterator<Item = (&'a str, String)>) -> bool {
        if self.head != Some(from) {
            return false;
        }
        for (table, key) in written {
            if let Some(rows) = self.rows.get_mut(table) {
                if rows.remove(key.as_str()).is_some() {
                    self.held -= 1;
                    self.budget.release(1);
                }
            }
        }
        self.head = Some(to);
        true
    }

    /// Take out the row a device addresses with `pushed_key` (its key object as JSON text), if
    /// held and merged under this `table` description. Returns the key as Postgres renders it
    /// (as JSON text) and the row.
    pub(super) fn take(&mut self, table: &Arc<TableSchema>, pushed_key: &str) -> Option<(String, CachedRow)> {
        let rows = self.rows.get_mut(table.name.as_str())?;
        let (normalized, stored) = match rows.remove_entry(pushed_key) {
            Some(held) => held,
            None => {
                let normalized = self.aliases.get(table.name.as_str())?.get(pushed_key)?;
                rows.remove_entry(normalized)?
            }
        };
        self.held -= 1;
        self.budget.release(1);
        if !Arc::ptr_eq(&stored.table, table) {
            return None;
        }
        let row = stored.restore(&normalized)?;
        Some((normalized.into(), row))
    }

    /// After a commit that left the tenant's head at `head`: hold `rows` (keyed by table and
    /// key as Postgres renders it), current as of then, and the keys devices used for them.
    /// Rows held before stay, being current too (the head moved only by this commit). When
    /// the cache would pass its limit, it starts over with this commit's rows alone; when all
    /// tenants' caches together hold the budget, it holds what is left of it.
    pub(super) fn put(
        &mut self,
        head: Seq,
        rows: impl ExactSizeIterator<Item = ((String, String), CachedRow)>,
        aliases: impl Iterator<Item = ((String, String), String)>,
    ) {
        if self.limit == 0 {
            return;
        }
        if self.held + rows.len() > self.limit || self.aliases_held + rows.len() > 2 * self.limit {
            self.drop_rows();
        }
        self.head = Some(head);
        let wanted = rows.len().min(self.limit);
        let mut granted = self.budget.reserve(wanted);
        if granted < wanted && self.held > 0 {
            // The budget is spent: this tenant's newest rows are worth more to it than its older.
            self.drop_rows();
            granted += self.budget.reserve(wanted - granted);
        }
        let before = self.held;
        for ((table, key), row) in rows.take(granted) {
            let Some(stored) = StoredRow::of(row) else { continue };
            // A row held already was replaced, not added.
            if self.rows.entry(table).or_default().insert(key.into_boxed_str(), stored).is_none() {
                self.held += 1;
            }
        }
        self.budget.release(granted - (self.held - before));
        for ((table, pushed), normalized) in aliases {
            if pushed == normalized {
                continue;
            }
            if self.aliases_held >= 2 * self.limit {
                break;
            }
            if self.aliases.entry(table).or_default().insert(pushed.into_boxed_str(), normalized.into_boxed_str()).is_none() {
                self.aliases_held += 1;
            }
        }
    }
}

impl Drop for RowCache {
    fn drop(&mut self) {
        self.budget.release(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MergePolicy;
    use crate::sync::merge::{self, FieldClock, Incoming};
    use protocol::{Hlc, Op};
    use serde_json::json;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The lib's test binary counts, per thread, the bytes its allocations hold, so a test can
    /// tell what a structure costs. Tests run on threads of their own, so they do not see each
    /// other's allocations.
    struct CountingAllocator;

    thread_local! {
        static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        // During a thread's teardown the counter may be gone; nothing measures then.
        let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + delta));
    }

    // SAFETY: every call is passed on to the system allocator unchanged.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size() as isize);
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-(layout.size() as isize));
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: CountingAllocator = CountingAllocator;

    fn live_bytes() -> isize {
        LIVE_BYTES.with(Cell::get)
    }

    fn products() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            name: "products".into(),
            tenant_column: "tenant_id".into(),
            tenant_type: "text".into(),
            key: vec!["id".into()],
            columns: Default::default(),
            policy: MergePolicy::Lww,
            row_json: "to_json",
            plain_updates: None,
            read_sql: String::new(),
            read_locking_cursors_sql: String::new(),
            delete_sql: String::new(),
        })
    }

    fn row(table: &Arc<TableSchema>, id: &str, version: u64) -> ((String, String), CachedRow) {
        let key = json!({"id": id}).as_object().cloned().unwrap();
        let state = RowState { values: Some(key.clone()), version, ..RowState::default() };
        ((table.name.clone(), serde_json::Value::Object(key.clone()).to_string()), CachedRow { table: table.clone(), key, state })
    }

    fn alias(table: &Arc<TableSchema>, pushed: &str, id: &str) -> ((String, String), String) {
        ((table.name.clone(), pushed.to_owned()), json!({"id": id}).to_string())
    }

    fn any_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            "[a-zé\"\\ ]{0,6}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4).prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_row_comes_back_as_it_was_put(
            values in proptest::option::of(proptest::collection::btree_map("[a-z_]{1,6}", any_value(), 0..6)),
            version in 0u64..1_000,
        ) {
            let table = products();
            let (id, mut cached) = row(&table, "a", version);
            cached.state.values = values.map(|v| v.into_iter().collect());
            cached.state.clocks = [("n".to_string(), FieldClock { hlc: Hlc { wall_ms: 5, counter: 1 }, device: "d".into(), user: None, version })].into();
            let expected = cached.state.clone();
            let mut cache = RowCache::new(10, RowBudget::new(10));
            cache.put(version, [(id.clone(), cached)].into_iter(), std::iter::empty());
            let (_, back) = cache.take(&table, &id.1).expect("held");
            proptest::prop_assert_eq!(back.state, expected);
        }
    }

    #[test]
    fn rows_are_found_by_the_key_as_pushed_and_taken_out() {
        let table = products();
        let mut cache = RowCache::new(10, RowBudget::new(100));
        cache.put(7, [row(&table, "a", 7)].into_iter(), [alias(&table, r#"{"id":"A"}"#, "a")].into_iter());
        assert!(cache.usable_at(Some(7)));
        assert!(cache.take(&table, r#"{"id": "a"}"#).is_none(), "a key neither pushed that way nor as Postgres renders it is not known");
        let (normalized, taken) = cache.take(&table, r#"{"id":"A"}"#).expect("held");
        assert_eq!((normalized.as_str(), taken.state.version), (r#"{"id":"a"}"#, 7));
        assert!(cache.take(&table, r#"{"id":"A"}"#).is_none(), "taken out: the group owns it now");
    }

    #[test]
    fn another_head_or_a_reloaded_table_empties_or_misses() {
        let table = products();
        let mut cache = RowCache::new(10, RowBudget::new(100));
        cache.put(7, [row(&table, "a", 7)].into_iter(), [alias(&table, r#"{"id":"a"}"#, "a")].into_iter());
        assert!(!cache.usable_at(Some(8)), "another writer moved the head");
        assert!(cache.is_empty());
        assert!(!cache.usable_at(None), "a group that does not know the head");

        cache.put(8, [row(&table, "a", 8)].into_iter(), [alias(&table, r#"{"id":"a"}"#, "a")].into_iter());
        assert!(cache.usable_at(Some(8)));
        assert!(cache.take(&products(), r#"{"id":"a"}"#).is_none(), "merged under another description of the table");
    }

    #[test]
    fn another_writers_changes_drop_their_rows_and_keep_the_rest_current() {
        let table = products();
        let budget = RowBudget::new(100);
        let mut cache = RowCache::new(10, budget.clone());
        let aliases = |ids: &[&str]| ids.iter().map(|id| alias(&table, &json!({"id": id}).to_string(), id)).collect::<Vec<_>>();
        cache.put(7, [row(&table, "a", 7), row(&table, "b", 6)].into_iter(), aliases(&["a", "b"]).into_iter());
        // Another node wrote b at 8 and 9, and a row of a table not held.
        let written = [("products", json!({"id": "b"}).to_string()), ("products", json!({"id": "b"}).to_string()), ("customers", json!({"id": 1}).to_string())];
        assert!(cache.advance(7, 9, written.into_iter()));
        assert_eq!((cache.len(), budget.held()), (1, 1));
        assert!(cache.usable_at(Some(9)), "current as of the other writer's head");
        assert!(cache.take(&table, r#"{"id":"b"}"#).is_none(), "the row it wrote is read again");
        assert!(cache.take(&table, r#"{"id":"a"}"#).is_some(), "the row it did not write is kept");

        // Changes that do not follow the cache's head (some are unknown) change nothing.
        cache.put(9, [row(&table, "c", 9)].into_iter(), aliases(&["c"]).into_iter());
        assert!(!cache.advance(10, 12, std::iter::empty()));
        assert!(!cache.usable_at(Some(12)));
    }

    #[test]
    fn it_holds_at_most_its_limit_and_nothing_when_off() {
        let table = products();
        let mut cache = RowCache::new(2, RowBudget::new(100));
        let aliases = |ids: &[&str]| ids.iter().map(|id| alias(&table, &json!({"id": id}).to_string(), id)).collect::<Vec<_>>();
        cache.put(1, [row(&table, "a", 1), row(&table, "b", 1)].into_iter(), aliases(&["a", "b"]).into_iter());
        assert_eq!(cache.len(), 2);
        // Rows held stay current when only this cache's group moved the head; past the limit
        // the cache starts over with the newest group's rows.
        cache.put(2, [row(&table, "c", 2)].into_iter(), aliases(&["c"]).into_iter());
        assert_eq!(cache.len(), 1);
        assert!(cache.usable_at(Some(2)));
        assert!(cache.take(&table, r#"{"id":"c"}"#).is_some());
        assert!(cache.take(&table, r#"{"id":"a"}"#).is_none());

        let mut off = RowCache::off();
        off.put(1, [row(&table, "a", 1)].into_iter(), aliases(&["a"]).into_iter());
        assert!(off.is_empty());
        assert!(!off.usable_at(Some(1)));
    }

    #[test]
    fn all_tenants_together_hold_at_most_the_budget() {
        let table = products();
        let budget = RowBudget::new(3);
        let aliases = |ids: &[&str]| ids.iter().map(|id| alias(&table, &json!({"id": id}).to_string(), id)).collect::<Vec<_>>();
        let mut first = RowCache::new(10, budget.clone());
        let mut second = RowCache::new(10, budget.clone());
        first.put(1, [row(&table, "a", 1), row(&table, "b", 1)].into_iter(), aliases(&["a", "b"]).into_iter());
        second.put(1, [row(&table, "c", 1), row(&table, "d", 1)].into_iter(), aliases(&["c", "d"]).into_iter());
        assert_eq!((first.len(), second.len(), budget.held()), (2, 1, 3), "the second gets what is left");

        // A row taken out is counted again when the group puts it back.
        assert!(first.usable_at(Some(1)));
        let (_, a) = first.take(&table, r#"{"id":"a"}"#).unwrap();
        assert_eq!(budget.held(), 2);
        first.put(2, [((table.name.clone(), r#"{"id":"a"}"#.to_owned()), a)].into_iter(), std::iter::empty());
        assert_eq!((first.len(), budget.held()), (2, 3));

        // With the budget spent, a tenant gives up its older rows for its newest.
        second.put(2, [row(&table, "e", 2), row(&table, "f", 2)].into_iter(), aliases(&["e", "f"]).into_iter());
        assert_eq!((first.len(), second.len(), budget.held()), (2, 1, 3));
        first.clear();
        assert_eq!(budget.held(), 1);
        drop(second);
        assert_eq!(budget.held(), 0, "a stopped tenant's rows are given back");
    }

    /// A product row of six short columns as a group leaves it: written by a device's upsert
    /// (merged, with its clocks), values as Postgres returned them, and the key the device used.
    fn written_row(table: &Arc<TableSchema>, n: usize) -> (((String, String), CachedRow), ((String, String), String)) {
        let id = format!("01933051-0c35-7f18-9a2b-{n:012}");
        let key_text = json!({ "id": id }).to_string();
        let fields: Object = serde_json::from_str(&format!(r#"{{"sku":"SKU-{n}","name":"Tea","price_cents":300,"stock":5}}"#)).unwrap();
        let clock = FieldClock { hlc: Hlc { wall_ms: 1_731_662_042_118, counter: 0 }, device: "pos-a".into(), user: Some("user-a".into()), version: 0 };
        let change = Incoming { op: Op::Upsert, fields: &fields, clock: clock.clone(), base_version: 0 };
        let mut state = RowState::default();
        let decision = merge::decide(&state, &change, MergePolicy::Lww);
        let written: Object = serde_json::from_str(&format!(
            r#"{{"tenant_id":"store-1","id":"{id}","sku":"SKU-{n}","name":"Tea","price_cents":300,"stock":5}}"#
        ))
        .unwrap();
        merge::advance(&mut state, &decision, &clock, 1_000 + n as u64, Some(written));
        let key: Object = serde_json::from_str(&key_text).unwrap();
        let id = (table.name.clone(), key_text.clone());
        ((id, CachedRow { table: table.clone(), key, state }), ((table.name.clone(), key_text.clone()), key_text))
    }

    /// A cached row costs about what its values and clocks take to write down, not ten times
    /// more: the bytes a cache holds per row of six short columns (values, key, version, four
    /// field clocks, the map's share), against the ~120 bytes of the row as JSON text. Held as
    /// maps of maps it was 3,313 bytes; as text, 514.
    #[test]
    fn a_cached_row_of_six_short_columns_costs_under_640_bytes() {
        const ROWS: usize = 1_000;
        let table = products();
        let mut cache = RowCache::new(ROWS, RowBudget::new(ROWS));
        let before = live_bytes();
        let (rows, aliases): (Vec<_>, Vec<_>) = (0..ROWS).map(|n| written_row(&table, n)).unzip();
        cache.put(1, rows.into_iter(), aliases.into_iter());
        let per_row = (live_bytes() - before) / ROWS as isize;
        assert_eq!(cache.len(), ROWS);
        assert!(per_row < 640, "{per_row} bytes per cached row");
        // Still the row that went in.
        assert!(cache.usable_at(Some(1)));
        let (normalized, row) = cache.take(&table, &json!({"id": "01933051-0c35-7f18-9a2b-000000000007"}).to_string()).expect("held");
        let ((_, expected), _) = written_row(&table, 7);
        assert_eq!((normalized, row.key, row.state), (json!({"id": "01933051-0c35-7f18-9a2b-000000000007"}).to_string(), expected.key, expected.state));
    }
}
