// Presence: who is online in the tenant (the `presence` list, then `presence_diff` joins and
// leaves), and a short log of the joins and leaves seen.

import { $, h, replace, clock, timeEl, Summarizer } from './dom.js';

export const PRESENCE_SUB = 'presence';
const MAX_LOG = 20;

export class Presence {
  constructor() {
    this.list = $('#presence-list');
    this.count = $('#presence-count');
    this.log = $('#presence-log');
    this.note = $('#presence-note');
    this.online = new Map(); // session_id -> entry
    this.ownSession = null;
    this.render();
  }

  reset() {
    this.online = new Map();
    this.ownSession = null;
    this.note.textContent = '';
    replace(this.log, h('li', { class: 'muted empty' }, 'None since the console connected.'));
    this.render();
  }

  setOwnSession(id) {
    this.ownSession = id;
    this.render();
  }

  onFrame(frame) {
    if (frame.sub !== PRESENCE_SUB) return;
    if (frame.type === 'presence') {
      this.online = new Map(frame.online.map((p) => [p.session_id, p]));
      this.note.textContent = '';
      this.render();
    } else if (frame.type === 'presence_diff') {
      for (const p of frame.leaves ?? []) {
        this.online.delete(p.session_id);
        this.logEvent(p, 'left');
      }
      for (const p of frame.joins ?? []) {
        this.online.set(p.session_id, p);
        this.logEvent(p, 'joined');
      }
      this.render();
    }
  }

  unavailable(message) {
    this.note.textContent = message;
  }

  /** The connection dropped: the list is stale until the hub sends a fresh one. */
  stale() {
    if (this.online.size) this.note.textContent = 'Offline: this list is from before the connection dropped.';
  }

  logEvent(p, what) {
    this.summary ??= new Summarizer($('#presence-summary'), (n) => `${n} ${n === 1 ? 'join or leave' : 'joins and leaves'} since the last summary.`);
    this.summary.count();
    this.log.querySelector('.empty')?.remove();
    this.log.prepend(h('li', {}, h('span', { class: 'when' }, clock()), ' ', `${who(p)} ${what} (${where(p)})`));
    while (this.log.childElementCount > MAX_LOG) this.log.lastElementChild.remove();
  }

  render() {
    const entries = [...this.online.values()].sort((a, b) => a.since_ms - b.since_ms);
    this.count.textContent = `(${entries.length})`;
    replace(
      this.list,
      entries.length === 0
        ? h('li', { class: 'muted' }, 'Nobody else is online.')
        : entries.map((p) =>
          h('li', { class: `person mode-${p.mode}` },
            h('span', { class: 'person-name' }, who(p)),
            p.session_id === this.ownSession ? h('span', { class: 'tag' }, 'you') : null,
            h('span', { class: 'muted person-where' }, `${p.role} · ${where(p)} · since `, timeEl(p.since_ms, false)))),
    );
  }
}

function who(p) {
  return p.user_id || '(no user)';
}

function where(p) {
  return p.mode === 'dashboard' ? 'console' : `device ${p.device_id}`;
}
