// Live change feed: a subscription editor (table, AND of conditions, snapshot), the list of
// subscriptions on the socket, and the feed of `sub_rows` / `sub_delta` frames, newest first.

import { $, h, replace, show, showObject, clock, parseValue, Summarizer } from './dom.js';
import { catalog } from './catalog.js';

const MAX_ENTRIES = 200;
/** Where the tab keeps its subscriptions across reloads (sessionStorage, like the token). */
const SAVED_SUBS = 'synchub.console.subscriptions';

function savedSubs() {
  try {
    const specs = JSON.parse(sessionStorage.getItem(SAVED_SUBS) ?? '[]');
    return Array.isArray(specs) ? specs.filter((s) => s && typeof s.sub === 'string' && typeof s.table === 'string') : [];
  } catch {
    return [];
  }
}

/** Forget the tab's subscriptions (signing out). */
export function forgetSubscriptions() {
  try {
    sessionStorage.removeItem(SAVED_SUBS);
  } catch {
    // storage unavailable: nothing kept
  }
}
const MAX_SNAPSHOT_ROWS_SHOWN = 50;

const OPS = [
  ['eq', '= equals'],
  ['neq', '≠ differs from'],
  ['lt', '< less than'],
  ['lte', '≤ at most'],
  ['gt', '> greater than'],
  ['gte', '≥ at least'],
  ['in', 'one of'],
];
const OP_SIGN = { eq: '=', neq: '≠', lt: '<', lte: '≤', gt: '>', gte: '≥', in: 'in' };

export class Feed {
  constructor() {
    this.socket = null;
    this.form = $('#sub-form');
    this.conditions = $('#condition-list');
    this.error = $('#sub-error');
    this.list = $('#sub-list');
    this.empty = $('#sub-empty');
    this.feed = $('#feed');
    this.conditionSeq = 0;
    this.nameSeq = 0;
    /** sub name -> {spec, rows: Map(key json -> row), seq} for table subscriptions */
    this.tables = new Map();

    this.form.addEventListener('submit', (e) => {
      e.preventDefault();
      this.submit();
    });
    $('#add-condition').addEventListener('click', () => this.addCondition(true));
    $('#sub-table').addEventListener('change', () => this.offerColumns());
    $('#feed-clear').addEventListener('click', () => this.feed.replaceChildren());
    this.renderSubs();
  }

  /** The tables the form offers: the catalog's, else `names` (the console's config). */
  offerTables(names) {
    const select = $('#sub-table');
    const chosen = select.value;
    const tables = catalog.names().length ? catalog.names() : names;
    replace(select, h('option', { value: '' }, 'Choose a table'), tables.map((t) => h('option', { value: t }, t)));
    if (tables.includes(chosen)) select.value = chosen;
    this.offerColumns();
  }

  /** Each condition's column choices: the chosen table's columns, as the catalog has them. */
  offerColumns() {
    for (const select of this.conditions.querySelectorAll('select[name=column]')) this.fillColumns(select);
  }

  fillColumns(select) {
    const chosen = select.value;
    const columns = catalog.columns($('#sub-table').value);
    replace(select, h('option', { value: '' }, columns.length ? 'Choose a column' : 'Choose a table first'),
      columns.map((c) => h('option', { value: c.name }, `${c.name} (${c.type})`)));
    if (columns.some((c) => c.name === chosen)) select.value = chosen;
  }

  /** Start over on a new socket (after sign-in): no subscriptions, empty feed, one empty condition row. */
  bind(socket) {
    this.socket = socket;
    this.tables = new Map();
    this.feed.replaceChildren();
    this.conditions.replaceChildren();
    this.error.textContent = '';
    this.addCondition(false);
    // The subscriptions this tab had before a reload come back.
    for (const spec of savedSubs()) this.watch(spec).catch(() => {});
    this.renderSubs();
  }

  /** Keep the tab's subscriptions for a reload. */
  saveSubs() {
    try {
      sessionStorage.setItem(SAVED_SUBS, JSON.stringify([...this.tables.values()].map((t) => t.spec)));
    } catch {
      // storage unavailable: they last until the reload
    }
  }

  /** Subscribe with `spec`; refused, it is dropped and the error thrown. */
  async watch(spec) {
    this.tables.set(spec.sub, { spec, rows: new Map(), seq: null, keyCols: ['id'] });
    this.renderSubs();
    try {
      await this.socket.subscribe(spec);
      this.saveSubs();
    } catch (err) {
      this.tables.delete(spec.sub);
      this.saveSubs();
      this.renderSubs();
      throw err;
    }
  }

  addCondition(focus) {
    const n = ++this.conditionSeq;
    const id = (part) => `cond-${n}-${part}`;
    const select = h('select', { id: id('op'), name: 'op' }, OPS.map(([value, label]) => h('option', { value }, label)));
    const li = h(
      'li',
      { class: 'condition' },
      h('div', { class: 'field' }, h('label', { for: id('col') }, 'Column'), h('select', { id: id('col'), name: 'column' })),
      h('div', { class: 'field' }, h('label', { for: id('op') }, 'Operator'), select),
      h('div', { class: 'field' }, h('label', { for: id('val') }, 'Value'), h('input', { id: id('val'), name: 'value', autocomplete: 'off', 'aria-describedby': 'cond-help' })),
      h('button', {
        type: 'button',
        class: 'small remove',
        'aria-label': `Remove condition ${n}`,
        onclick: () => {
          const next = li.nextElementSibling ?? li.previousElementSibling;
          li.remove();
          (next?.querySelector('select') ?? $('#add-condition')).focus();
        },
      }, 'Remove'),
    );
    this.fillColumns(li.querySelector('select[name=column]'));
    this.conditions.append(li);
    if (focus) li.querySelector('select').focus();
  }

  /** Read the form into a subscribe spec, or throw an Error with what to fix. */
  readForm() {
    const table = $('#sub-table').value;
    if (!table) throw new Error('Choose the table to watch.');
    let name = $('#sub-name').value.trim();
    if (!name) {
      do name = `${table}-${++this.nameSeq}`; while (this.socket.has(name));
    }
    if (name.length > 64) throw new Error('The name may have at most 64 characters.');
    if (this.socket.has(name)) throw new Error(`A subscription named “${name}” exists already: choose another name.`);
    const filter = [];
    for (const li of this.conditions.querySelectorAll('li')) {
      const column = li.querySelector('[name=column]').value;
      const op = li.querySelector('[name=op]').value;
      const raw = li.querySelector('[name=value]').value;
      if (!column && raw.trim() === '') continue; // an untouched row: no condition
      if (!column) throw new Error('A condition has a value but no column: choose the column or remove the condition.');
      // An empty value would be sent as "" and match only empty text: ask for one instead.
      if (raw.trim() === '') throw new Error(`The condition on ${column} has no value: type one (for empty text, type "").`);
      let value = parseValue(raw);
      if (op === 'in' && !Array.isArray(value)) {
        value = raw.split(',').map((part) => parseValue(part.trim())).filter((v) => v !== '');
      }
      filter.push({ column, op, value });
    }
    const spec = { sub: name, table, snapshot: $('#sub-snapshot').checked };
    if (filter.length) spec.filter = filter;
    return spec;
  }

  async submit() {
    this.error.textContent = '';
    let spec;
    try {
      spec = this.readForm();
    } catch (err) {
      this.error.textContent = err.message;
      return;
    }
    try {
      await this.watch(spec);
      $('#sub-name').value = '';
    } catch (err) {
      this.error.textContent = `The hub refused the subscription: ${err.message ?? 'unknown error'} (${err.code ?? 'error'}).`;
    }
  }

  /** A subscription re-sent after a reconnect was refused. */
  refused(spec, err) {
    if (!this.tables.delete(spec.sub)) return;
    this.saveSubs();
    this.renderSubs();
    this.note(`Subscription “${spec.sub}” was refused after reconnecting: ${err.message} (${err.code}).`, 'error');
  }

  async unsubscribe(name) {
    this.tables.delete(name);
    this.saveSubs();
    this.renderSubs();
    try {
      await this.socket.unsubscribe(name);
    } catch (err) {
      this.note(`Could not unsubscribe “${name}”: ${err.message} (${err.code}).`, 'error');
    }
    this.note(`Stopped watching “${name}”.`);
    $('#sub-table').focus();
  }

  renderSubs() {
    const items = [...this.tables.entries()].map(([name, s]) =>
      h(
        'li',
        {},
        h('span', { class: 'sub-name' }, name),
        ' ',
        h('span', { class: 'muted' }, describeSpec(s.spec)),
        ' ',
        h('span', { class: 'muted' }, s.seq === null ? '· waiting for the hub' : `· ${s.rows.size} row${s.rows.size === 1 ? '' : 's'} in view`),
        ' ',
        h('button', { type: 'button', class: 'small', 'aria-label': `Unsubscribe ${name}`, onclick: () => this.unsubscribe(name) }, 'Unsubscribe'),
      ),
    );
    replace(this.list, items);
    this.empty.hidden = items.length > 0;
  }

  reconnected() {
    if (this.tables.size) this.note('Reconnected: subscriptions sent again. Changes made while the console was away are not in the feed; a snapshot shows the current rows.');
  }

  onFrame(frame) {
    const state = frame.sub !== undefined ? this.tables.get(frame.sub) : undefined;
    switch (frame.type) {
      case 'subscribed':
        if (!state) return;
        state.rows = new Map();
        state.seq = frame.seq;
        this.add(h('li', { class: 'entry note' }, head(frame.sub, 'subscribed', `at seq ${frame.seq}`), h('p', {}, describeSpec(state.spec))));
        this.renderSubs();
        break;
      case 'sub_rows':
        if (!state) return;
        for (const r of frame.rows) state.rows.set(keyOf(r.row, state.keyCols), r.row);
        this.add(snapshotEntry(frame, state.spec.table));
        this.renderSubs();
        break;
      case 'sub_delta':
        if (!state) return;
        for (const d of frame.deltas) {
          learnKey(state, d.key);
          if (d.op === 'delete') state.rows.delete(keyOf(d.key, state.keyCols));
          else state.rows.set(keyOf(d.key, state.keyCols), d.row);
          this.add(deltaEntry(frame.sub, d));
        }
        state.seq = frame.seq;
        this.renderSubs();
        break;
      default:
        break;
    }
  }

  note(text, cls = '') {
    this.add(h('li', { class: `entry note ${cls}` }, h('p', {}, h('span', { class: 'when' }, clock()), ' ', text)));
  }

  add(li) {
    // Read out as a summary every few seconds, not entry by entry (a busy store would flood it).
    this.summary ??= new Summarizer($('#feed-summary'), (n) => `${n} new ${n === 1 ? 'entry' : 'entries'} in the feed.`);
    this.summary.count();
    this.feed.prepend(li);
    while (this.feed.childElementCount > MAX_ENTRIES) this.feed.lastElementChild.remove();
  }
}

function describeSpec(spec) {
  const conds = (spec.filter ?? []).map((c) => `${c.column} ${OP_SIGN[c.op] ?? c.op} ${show(c.value)}`);
  return `${spec.table}${conds.length ? ` where ${conds.join(' and ')}` : ' (all rows)'}${spec.snapshot ? ', with snapshot' : ''}`;
}

/**
 * The identity of a row in a subscription's view: its key columns' values. Snapshot rows carry
 * no key of their own, so the key columns are guessed (`id`) until a delta names them.
 */
function keyOf(row, keyCols) {
  if (!row || keyCols.some((c) => !(c in row))) return JSON.stringify(row);
  return JSON.stringify(keyCols.map((c) => row[c]));
}

function learnKey(state, key) {
  const cols = Object.keys(key ?? {}).sort();
  if (!cols.length || cols.join() === state.keyCols.join()) return;
  state.keyCols = cols;
  state.rows = new Map([...state.rows.values()].map((row) => [keyOf(row, cols), row]));
}

/** What an entry's label says for its kind. */
const KIND_TEXT = { 'left-filter': 'left the filter' };

function head(sub, kind, extra) {
  return h('p', { class: 'entry-head' },
    h('span', { class: 'when' }, clock()), ' ',
    h('span', { class: `kind kind-${kind}` }, KIND_TEXT[kind] ?? kind), ' ',
    h('span', { class: 'sub-name' }, sub), ' ',
    h('span', { class: 'muted' }, extra));
}

function snapshotEntry(frame, table) {
  const rows = frame.rows.slice(0, MAX_SNAPSHOT_ROWS_SHOWN);
  const more = frame.rows.length - rows.length;
  const count = `${frame.rows.length} row${frame.rows.length === 1 ? '' : 's'} at seq ${frame.seq}${frame.last ? '' : ' (more pages follow)'}`;
  return h('li', { class: 'entry snapshot' },
    head(frame.sub, 'snapshot', count),
    frame.rows.length
      ? h('details', {}, h('summary', {}, 'Show rows'),
        h('ul', { class: 'rows' }, rows.map((r) => h('li', {}, h('span', { class: 'muted' }, `v${r.version} `), rowText(table, r.row)))),
        more > 0 ? h('p', { class: 'muted' }, `…and ${more} more`) : null)
      : null);
}

/** A delta's row label (from its row, or the old values of a delete), then a separator. */
function rowLabel(d) {
  const label = catalog.labelOf(d.table, d.row ?? d.old);
  return label === null ? null : [h('strong', { class: 'row-label' }, label), ' · '];
}

/** A row as `col=value, …`, led by its label where its table has one. */
function rowText(table, row) {
  const label = catalog.labelOf(table, row);
  return label === null ? catalog.formatRow(table, row) : [h('strong', { class: 'row-label' }, label), ' · ', catalog.formatRow(table, row)];
}

function deltaEntry(sub, d) {
  // A delete with `left` is a row that still exists but no longer matches the subscription.
  const kind = d.op === 'delete' ? (d.left ? 'left-filter' : 'delete') : d.old && Object.keys(d.old).length ? 'update' : 'insert';
  const lines = [];
  if (kind === 'update') {
    for (const [col, before] of Object.entries(d.old)) {
      const [was, now] = [catalog.format(d.table, col, before), catalog.format(d.table, col, d.row?.[col])];
      lines.push(h('li', {}, h('span', { class: 'col' }, col), ': ', h('span', { class: 'before' }, was), ' → ', h('span', { class: 'after' }, now)));
    }
  } else if (kind === 'insert') {
    lines.push(h('li', {}, catalog.formatRow(d.table, d.row)));
  } else if (d.old) {
    lines.push(h('li', {}, h('span', { class: 'muted' }, 'was '), catalog.formatRow(d.table, d.old)));
  }
  return h('li', { class: `entry delta ${kind}` },
    head(sub, kind, `${d.table} · seq ${d.seq}`),
    h('p', { class: 'key' }, rowLabel(d), h('span', { class: 'muted' }, 'key '), showObject(d.key), d.origin ? h('span', { class: 'muted' }, ` · by ${d.origin}`) : h('span', { class: 'muted' }, ' · by SQL')),
    lines.length ? h('ul', { class: 'changes' }, lines) : null);
}
