// What the hub says of its synced tables (GET /v1/catalog, for managers): each table's key and
// columns, the column that names its rows (label) and how some columns read (money, local
// time). The console shows rows by their labels and values as people read them, and offers
// real tables and columns when subscribing. Presentation only: what is sent is never changed.

import { show } from './dom.js';

const localTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

export class Catalog {
  constructor() {
    this.tables = new Map();
    this.currency = 'USD';
    this.money = null;
  }

  /** Take the catalog API's answer. */
  set(body) {
    this.tables = new Map((body?.tables ?? []).map((t) => [t.name, t]));
    this.currency = body?.currency ?? 'USD';
    try {
      this.money = new Intl.NumberFormat(undefined, { style: 'currency', currency: this.currency });
    } catch {
      this.money = null;
    }
  }

  names() {
    return [...this.tables.keys()];
  }

  /** The table's columns a client writes or filters on ({name, type}), key columns first. */
  columns(table) {
    const t = this.tables.get(table);
    if (!t) return [];
    const key = new Set(t.key ?? []);
    return [...(t.columns ?? [])].sort((a, b) => Number(key.has(b.name)) - Number(key.has(a.name)));
  }

  labelColumn(table) {
    return this.tables.get(table)?.label_column ?? null;
  }

  /** The label of `row` (a row of `table`), when the table has a label column and the row holds it. */
  labelOf(table, row) {
    const column = this.labelColumn(table);
    const value = column && row ? row[column] : null;
    return value === null || value === undefined ? null : String(value);
  }

  /** A value as people read it: money columns as money, timestamps in local time; anything
   * else, or a value that does not fit its format, as JSON shows it. */
  format(table, column, value) {
    const format = this.tables.get(table)?.formats?.[column];
    if (format === 'money_cents' && Number.isInteger(value) && this.money) return this.money.format(value / 100);
    if (format === 'local_time' && typeof value === 'string') {
      const when = new Date(value);
      if (!Number.isNaN(when.getTime())) return localTime.format(when);
    }
    return show(value);
  }

  /** A row as `col=value, …`, each value formatted. */
  formatRow(table, row) {
    if (!row || typeof row !== 'object') return show(row);
    return Object.entries(row).map(([col, v]) => `${col}=${this.format(table, col, v)}`).join(', ');
  }
}

/** The page's one catalog, filled once a manager's token is accepted. */
export const catalog = new Catalog();
