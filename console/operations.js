// Operations, for managers: the tenant's devices (online now, last seen, the position each has
// and how far behind the head it is) and the last 24 hours of changes and conflicts as two
// small bar charts drawn here as SVG, from GET /v1/operations; refreshed while the view is
// open. A device not seen today (local time) stands out, in words as well as colour.

import { $, h, replace, clock, dateTime } from './dom.js';
import { ApiError } from './api.js';

/** How often the open view asks the hub again, ms. */
export const REFRESH_MS = 30_000;
const SVG_NS = 'http://www.w3.org/2000/svg';
/** The charts' drawing size (they scale to their box). */
const CHART_W = 480;
const CHART_H = 120;
const AXIS_H = 18;

/** An SVG element: attributes as attributes (the policy forbids inline styles), children appended. */
function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** Midnight of `now`'s day, in this browser's time zone. */
export function startOfToday(now = new Date()) {
  const d = new Date(now);
  d.setHours(0, 0, 0, 0);
  return d;
}

/** Whether the device was seen since local midnight (online counts as now). */
export function seenToday(device, now = new Date()) {
  if (device.online) return true;
  const seen = device.last_seen ? new Date(device.last_seen) : null;
  return seen !== null && !Number.isNaN(seen.getTime()) && seen >= startOfToday(now);
}

const hourFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

/** "14:00–15:00" for an hour's start (local time). */
function hourRange(start) {
  const d = new Date(start);
  return `${hourFmt.format(d)}–${hourFmt.format(new Date(d.getTime() + 3_600_000))}`;
}

/** A sentence for screen readers (and everyone): total, the busiest hour, and the empty hours. */
export function chartSummary(what, hours, key) {
  const total = hours.reduce((n, b) => n + b[key], 0);
  if (total === 0) return `${what} in the last ${hours.length} hours: none.`;
  const busiest = hours.reduce((best, b) => (b[key] > best[key] ? b : best), hours[0]);
  const empty = hours.filter((b) => b[key] === 0).length;
  const last = hours[hours.length - 1];
  return `${what} in the last ${hours.length} hours: ${total} in all; the most, ${busiest[key]}, from ${hourRange(busiest.hour)}; `
    + `${last[key]} in the current hour; none in ${empty} of the ${hours.length} hours.`;
}

/** A bar chart of `hours[i][key]`: one bar per hour (a title on each), a baseline, and the
 * first and last hours as labels. The figure's caption is the chart's text summary. */
function barChart(id, what, hours, key) {
  const max = Math.max(1, ...hours.map((b) => b[key]));
  const slot = CHART_W / hours.length;
  const plotH = CHART_H - AXIS_H;
  const bars = hours.map((b, i) => {
    const height = b[key] === 0 ? 0 : Math.max(2, Math.round((b[key] / max) * (plotH - 14)));
    return svg('rect', { class: `bar${b[key] === 0 ? ' bar-zero' : ''}`, x: (i * slot + 1).toFixed(1), y: plotH - height,
      width: Math.max(1, slot - 2).toFixed(1), height, 'data-value': b[key] },
    svg('title', {}, `${hourRange(b.hour)}: ${b[key]}`));
  });
  const summaryId = `${id}-summary`;
  return [
    h('figcaption', {}, h('span', { class: 'chart-title' }, what), h('span', { id: summaryId, class: 'chart-summary' }, chartSummary(what, hours, key))),
    svg('svg', { viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: 'chart-svg', role: 'img', 'aria-labelledby': summaryId },
      svg('text', { x: 0, y: 10, class: 'chart-max' }, `max ${max}`),
      ...bars,
      svg('line', { x1: 0, y1: plotH + 0.5, x2: CHART_W, y2: plotH + 0.5, class: 'chart-axis' }),
      svg('text', { x: 0, y: CHART_H - 4, class: 'chart-label' }, hourFmt.format(new Date(hours[0].hour))),
      svg('text', { x: CHART_W, y: CHART_H - 4, class: 'chart-label', 'text-anchor': 'end' }, 'now')),
  ];
}

/** Devices not seen today first (the ones to look at), then offline, then online; by id within. */
function order(devices, now) {
  const rank = (d) => (!seenToday(d, now) ? 0 : d.online ? 2 : 1);
  return [...devices].sort((a, b) => rank(a) - rank(b) || a.device_id.localeCompare(b.device_id));
}

function statusCell(d, now) {
  if (d.online) return h('td', { class: 'ops-status' }, h('span', { class: 'state state-online' }, '● Online'));
  if (!seenToday(d, now)) return h('td', { class: 'ops-status' }, h('span', { class: 'state state-stale' }, '⚠ Not seen today'));
  return h('td', { class: 'ops-status' }, h('span', { class: 'state state-offline' }, '○ Offline'));
}

/** How far behind the head the device is. An online device's position is where its session
 * resumed from: it has been receiving every change live since. */
function lagText(d) {
  if (d.lag === null || d.lag === undefined) return d.online ? 'live' : '—';
  if (d.online) return d.lag === 0 ? 'live, up to date' : `live (${d.lag} behind at connect)`;
  return d.lag === 0 ? 'up to date' : `${d.lag} behind`;
}

export class Operations {
  constructor() {
    this.api = null;
    this.panel = $('#operations');
    this.toggle = $('#ops-toggle');
    this.body = $('#ops-device-rows');
    this.timer = null;
    this.loading = 0;
    this.toggle.addEventListener('click', () => (this.panel.hidden ? this.open() : this.close()));
    $('#ops-refresh').addEventListener('click', () => this.load());
    this.panel.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !e.defaultPrevented) {
        e.preventDefault();
        this.close();
      }
    });
    // A tab in the background does not poll; it catches up when shown again.
    document.addEventListener('visibilitychange', () => {
      if (!this.panel.hidden && document.visibilityState === 'visible') this.load();
    });
  }

  /** A new session: its API; the view starts closed. */
  bind(api) {
    this.api = api;
    this.close(false);
    this.disable();
  }

  /** The token's role may see operations: offer the view. */
  enable() {
    this.toggle.hidden = false;
  }

  disable() {
    this.toggle.hidden = true;
    this.close(false);
  }

  open() {
    if (!this.api) return;
    this.panel.hidden = false;
    this.toggle.setAttribute('aria-expanded', 'true');
    this.toggle.textContent = 'Hide operations';
    this.panel.scrollIntoView({ block: 'start' });
    $('#operations-h').focus();
    this.load();
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      if (document.visibilityState === 'visible') this.load();
    }, REFRESH_MS);
  }

  close(returnFocus = true) {
    clearInterval(this.timer);
    this.timer = null;
    const wasOpen = !this.panel.hidden;
    this.panel.hidden = true;
    this.toggle.setAttribute('aria-expanded', 'false');
    this.toggle.textContent = 'Operations';
    if (returnFocus && wasOpen && !this.toggle.hidden) this.toggle.focus();
  }

  async load() {
    if (!this.api || this.panel.hidden) return;
    const api = this.api;
    const mine = ++this.loading;
    $('#ops-refresh').disabled = true;
    try {
      const data = await api.request('GET', '/v1/operations');
      if (mine !== this.loading || api !== this.api) return;
      $('#ops-error').textContent = '';
      this.render(data);
    } catch (err) {
      if (mine !== this.loading || api !== this.api) return;
      $('#ops-error').textContent = `Operations could not be read: ${err instanceof ApiError ? err.describe() : err.message}`;
    } finally {
      if (mine === this.loading) $('#ops-refresh').disabled = false;
    }
  }

  render(data) {
    const now = new Date();
    const devices = order(data.devices ?? [], now);
    const stale = devices.filter((d) => !seenToday(d, now));
    $('#ops-updated').textContent = `Updated at ${clock(now)} · head seq ${data.head_seq} · refreshed every ${REFRESH_MS / 1000} s while open`;
    replace($('#ops-devices-summary'),
      `${devices.length} device${devices.length === 1 ? '' : 's'}, ${data.online} online, `,
      h('strong', {}, `${stale.length} not seen today`),
      stale.length ? `: ${stale.map((d) => d.device_id).join(', ')}.` : '.',
      data.devices_truncated ? ' Only the first devices by id are listed.' : '');
    replace(this.body, devices.map((d) => h('tr', { class: seenToday(d, now) ? (d.online ? 'online' : '') : 'stale', dataset: { device: d.device_id } },
      h('th', { scope: 'row' }, d.device_id),
      h('td', {}, d.user_id ?? '—'),
      statusCell(d, now),
      h('td', {}, d.online ? 'now' : d.last_seen ? h('time', { datetime: d.last_seen }, dateTime(d.last_seen)) : 'never'),
      h('td', { class: 'num' }, d.position ?? '—'),
      h('td', { class: 'num' }, lagText(d)),
      h('td', {}, d.last_push ? h('time', { datetime: d.last_push }, dateTime(d.last_push)) : '—'))));
    $('#ops-empty').hidden = devices.length > 0;
    const hours = data.hours ?? [];
    if (hours.length) {
      replace($('#ops-changes'), barChart('ops-changes', 'Changes pushed per hour', hours, 'pushed'));
      replace($('#ops-conflicts'), barChart('ops-conflicts', 'Conflicts per hour', hours, 'conflicts'));
    }
  }
}
