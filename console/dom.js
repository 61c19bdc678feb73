// DOM helpers. Every value that comes from the hub or a user goes in as text (textContent or
// text nodes), never as markup.

/**
 * Build an element: h('li', {class: 'x', onclick: fn, 'aria-label': 'y'}, 'text', child, ...).
 * Keys starting with "on" add listeners; `class`, `text`, `hidden`, `disabled`, `value`,
 * `checked`, `dataset` are set as properties; others as attributes. Null/undefined/false
 * children and attributes are skipped; arrays of children are flattened.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'class') {
      el.className = value;
    } else if (key === 'text') {
      el.textContent = value;
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (['hidden', 'disabled', 'value', 'checked', 'selected'].includes(key)) {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace all children of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** A JSON value as the console shows it: strings quoted, so `"10"` and `10` look different. */
export function show(value) {
  if (value === undefined) return '(absent)';
  return JSON.stringify(value);
}

/** A row or key as `col=value, col=value`. */
export function showObject(obj) {
  if (!obj || typeof obj !== 'object') return show(obj);
  return Object.entries(obj).map(([k, v]) => `${k}=${show(v)}`).join(', ');
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

export function clock(date = new Date()) {
  return timeFmt.format(date);
}

export function dateTime(value) {
  const d = value instanceof Date ? value : new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : dateTimeFmt.format(d);
}

/** A `<time>` element for a Date, ms number or RFC 3339 string. */
export function timeEl(value, withDate = true) {
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) return h('span', {}, String(value));
  return h('time', { datetime: d.toISOString() }, withDate ? dateTimeFmt.format(d) : timeFmt.format(d));
}

/** A definition list from [term, description] pairs (descriptions may be nodes). */
export function dl(pairs, cls) {
  return h('dl', { class: cls }, pairs.filter(Boolean).map(([dt, dd]) => [h('dt', {}, dt), h('dd', {}, dd)]));
}

/**
 * Read what a person typed as a JSON value: numbers, true, false, null, quoted strings,
 * arrays and objects are JSON; anything else is taken as text.
 */
export function parseValue(text) {
  const t = text.trim();
  if (t === '') return '';
  try {
    return JSON.parse(t);
  } catch {
    return text;
  }
}

/**
 * Tells screen readers how much a busy list changed, at most once per interval, instead of
 * reading every entry as it arrives: `count()` for each entry, `say(n)` builds the sentence.
 */
export class Summarizer {
  constructor(el, say, intervalMs = 10_000) {
    this.el = el;
    this.say = say;
    this.intervalMs = intervalMs;
    this.pending = 0;
    this.timer = null;
  }

  count() {
    this.pending += 1;
    if (this.timer === null) this.timer = setTimeout(() => this.flush(), this.intervalMs);
  }

  flush() {
    this.timer = null;
    if (this.pending === 0) return;
    this.el.textContent = this.say(this.pending);
    this.pending = 0;
  }
}
