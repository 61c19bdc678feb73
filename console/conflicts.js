// Conflict review, for managers: the open-count badge, the list (GET /v1/conflicts with status
// and table filters, kept current by `conflict` frames), one conflict side by side (server vs
// incoming, with the current row), and the three ways to resolve it.

import { $, h, replace, show, dl, timeEl, dateTime, parseValue } from './dom.js';
import { ApiError } from './api.js';
import { catalog } from './catalog.js';

export const CONFLICT_SUB = 'conflicts';
const PAGE = 50;
/** Conflicts whose labels are read at once, as they come in live. */
const LABEL_READS = 8;

const RESOLUTION_TEXT = {
  keep: 'kept the winning value',
  take_other: 'took the other value',
  value: 'wrote a new value',
  dismiss: 'dismissed it (nothing written)',
};

/** Whether the conflict's winner deleted the row. */
function deleteWon(c) {
  return c.policy === 'delete_wins';
}

/** Why the winning side was kept, in words a manager reads without the sync spec. */
export function whyKept(c) {
  if (deleteWon(c)) return 'a delete wins';
  if (c.policy === 'client_wins') return 'this table keeps the latest push';
  return 'newer';
}

/** "Kept: pos-2's change (newer)" and "Not kept: pos-1's change": a side of the conflict in
 * plain words. */
export function sideWords(c, name) {
  const kept = (c.winner === 'server' ? 'server' : 'incoming') === name;
  const whose = `${c[name]?.device ?? 'an unknown device'}'s change`;
  return kept ? `Kept: ${whose} (${whyKept(c)})` : `Not kept: ${whose}`;
}

/** The review's place in the page's URL (`#status=open&table=products&conflict=17`), so that a
 * reload keeps it and a link can point at one conflict. */
export function readPlace(hash = location.hash) {
  const params = new URLSearchParams(hash.replace(/^#/, ''));
  const id = Number.parseInt(params.get('conflict') ?? '', 10);
  const day = (name) => (/^\d{4}-\d{2}-\d{2}$/.test(params.get(name) ?? '') ? params.get(name) : '');
  return {
    status: params.has('status') ? params.get('status') : 'open',
    table: params.get('table') ?? '',
    device: params.get('device') ?? '',
    user: params.get('user') ?? '',
    field: params.get('field') ?? '',
    label: params.get('label') ?? '',
    since: day('since'),
    until: day('until'),
    conflict: Number.isSafeInteger(id) && id > 0 ? id : null,
  };
}

const FILTER_TEXT = ['table', 'device', 'user', 'field', 'label', 'since', 'until'];

/** The filters as the form shows them: dates as the form's local days. */
function formFilters() {
  const form = new FormData($('#conflict-filters'));
  const filters = { status: String(form.get('status') ?? '') };
  for (const name of FILTER_TEXT) filters[name] = String(form.get(name) ?? '').trim();
  return filters;
}

/** The API's query for the filters: days become the local day's start (and the end of the
 * "to" day, exclusive) as RFC 3339. */
function apiFilters(filters) {
  const start = (day, plus = 0) => {
    if (!day) return '';
    const d = new Date(`${day}T00:00:00`);
    d.setDate(d.getDate() + plus);
    return d.toISOString();
  };
  const { status, table, device, user, field, label } = filters;
  return { status, table, device, user, field, label, since: start(filters.since), until: start(filters.until, 1) };
}

function writePlace(filters, conflict) {
  const params = new URLSearchParams();
  params.set('status', filters.status);
  for (const name of FILTER_TEXT) if (filters[name]) params.set(name, filters[name]);
  if (conflict !== null) params.set('conflict', String(conflict));
  const hash = `#${params.toString()}`;
  if (location.hash !== hash) history.replaceState(null, '', hash);
}

export class Conflicts {
  constructor() {
    this.api = null;
    this.panel = $('#conflicts');
    this.listEl = $('#conflict-list');
    this.emptyEl = $('#conflict-empty');
    this.moreBtn = $('#conflict-more');
    this.errorEl = $('#conflicts-error');
    this.noteEl = $('#conflicts-note');
    this.detailEl = $('#conflict-detail');
    this.badge = $('#badge');
    this.badgeText = $('#badge-text');
    this.filters = { status: 'open', table: '', device: '', user: '', field: '', label: '', since: '', until: '' };
    this.takePlace();
    this.items = new Map(); // id -> conflict, in list order
    this.nextBeforeId = null;
    this.openId = null;
    this.loadSeq = 0;
    this.chosen = new Set(); // ids selected for a bulk action

    $('#conflict-filters').addEventListener('submit', (e) => {
      e.preventDefault();
      this.filters = formFilters();
      writePlace(this.filters, this.openId);
      this.load();
    });
    // A link to another conflict or filter followed within the page.
    window.addEventListener('hashchange', () => {
      this.takePlace();
      if (this.api && !this.panel.hidden) this.load();
    });
    this.moreBtn.addEventListener('click', () => this.load(false));
    $('#conflict-export').addEventListener('click', () => this.exportCsv());
    $('#bulk-all').addEventListener('change', (e) => {
      this.chosen = e.target.checked ? new Set([...this.items.values()].filter((c) => c.status === 'open').map((c) => c.id)) : new Set();
      this.renderList();
    });
    const bulk = [['#bulk-keep', 'keep', 'kept what was kept'], ['#bulk-take-other', 'take_other', 'used the other values'], ['#bulk-dismiss', 'dismiss', 'dismissed']];
    for (const [button, action, done] of bulk) $(button).addEventListener('click', () => this.resolveChosen(action, done));
    this.badge.addEventListener('click', (e) => {
      e.preventDefault();
      this.panel.scrollIntoView({ block: 'start' });
      (this.listEl.querySelector('button') ?? $('#conflicts-h')).focus();
    });
    this.detailEl.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !e.defaultPrevented) {
        e.preventDefault();
        this.close();
      }
    });
  }

  /** Resolve the selected conflicts the same way; say what was applied and what was refused. */
  async resolveChosen(action, done) {
    const ids = [...this.chosen].sort((a, b) => b - a);
    if (!ids.length) return;
    const result = $('#bulk-result');
    this.errorEl.textContent = '';
    result.textContent = `Working on ${ids.length} conflict${ids.length === 1 ? '' : 's'}…`;
    let out;
    try {
      out = await this.api.resolveMany(action, ids);
    } catch (err) {
      result.textContent = '';
      this.errorEl.textContent = `Could not review the selected conflicts: ${describe(err)}`;
      return;
    }
    for (const r of out.results) {
      if (r.applied && r.conflict) this.items.set(r.id, r.conflict);
    }
    const refused = out.results.filter((r) => !r.applied);
    this.chosen = new Set(refused.map((r) => r.id));
    const summary = `${out.applied} ${done}` + (refused.length ? `; ${refused.length} refused: ${refused.map((r) => `#${r.id} (${r.message})`).join('; ')}` : '.');
    result.textContent = summary;
    this.renderList();
    this.refreshCounts();
    if (this.openId !== null && out.results.some((r) => r.id === this.openId)) this.show(this.openId, { keepFocus: true });
  }

  /** Download every conflict the shown filters match as a CSV file (the form's values as
   * they are now, shown or not). */
  async exportCsv() {
    const filters = formFilters();
    this.errorEl.textContent = '';
    this.noteEl.textContent = 'Preparing the CSV file…';
    try {
      const blob = await this.api.exportCsv(apiFilters(filters));
      const url = URL.createObjectURL(blob);
      const link = h('a', { href: url, download: `conflicts-${filters.status || 'any'}.csv`, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      this.noteEl.textContent = 'The CSV file was downloaded.';
    } catch (err) {
      this.noteEl.textContent = '';
      this.errorEl.textContent = `Could not export the conflicts: ${describe(err)}`;
    }
  }

  /** Filters from the URL into the form; returns the conflict the URL names, if any. */
  takePlace() {
    const place = readPlace();
    this.filters = { status: place.status };
    for (const name of FILTER_TEXT) this.filters[name] = place[name];
    const status = $('#cf-status');
    if ([...status.options].some((o) => o.value === place.status)) status.value = place.status;
    for (const name of FILTER_TEXT) $(`#cf-${name}`).value = place[name];
    this.wanted = place.conflict;
    return place.conflict;
  }

  /** Start over with a new token: empty list, closed detail, filters as they are. */
  bind(api) {
    this.api = api;
    this.items = new Map();
    this.nextBeforeId = null;
    this.openId = null;
    this.lastResult = null;
    this.loadSeq += 1;
    this.detailEl.hidden = true;
    this.detailEl.replaceChildren();
    this.noteEl.textContent = '';
    this.errorEl.textContent = '';
    this.setOpenCount(0);
    this.renderList();
    this.disable();
  }

  /** Show the panel and badge (the token's role may review conflicts). */
  enable() {
    this.panel.hidden = false;
    this.badge.hidden = false;
  }

  disable() {
    this.panel.hidden = true;
    this.badge.hidden = true;
  }

  note(text) {
    this.noteEl.textContent = text;
  }

  setOpenCount(open) {
    this.open = open;
    this.badgeText.textContent = `Conflicts: ${open} open`;
    this.badge.classList.toggle('has-open', open > 0);
  }

  async refreshCounts() {
    try {
      const counts = await this.api.counts();
      this.setOpenCount(counts.open);
      return counts;
    } catch (err) {
      this.errorEl.textContent = `Could not read the conflict counts: ${describe(err)}`;
      return null;
    }
  }

  /** Load the list from the start (reset) or the next older page. */
  async load(reset = true) {
    const seq = ++this.loadSeq;
    this.errorEl.textContent = '';
    const query = { ...apiFilters(this.filters), limit: PAGE };
    if (!reset) query.before_id = this.nextBeforeId;
    let page;
    try {
      page = await this.api.conflicts(query);
    } catch (err) {
      if (seq === this.loadSeq) this.errorEl.textContent = `Could not load conflicts: ${describe(err)}`;
      return;
    }
    if (seq !== this.loadSeq) return; // a newer load is under way
    if (reset) {
      this.items = new Map();
      this.refreshCounts(); // the same moment's count, for the badge
    }
    for (const c of page.conflicts) this.items.set(c.id, c);
    this.nextBeforeId = page.next_before_id ?? null;
    this.renderList();
    // A conflict the URL names (a link, or the page reloaded) opens once the list is there.
    if (reset && this.wanted !== null) {
      const wanted = this.wanted;
      this.wanted = null;
      if (this.openId !== wanted) this.show(wanted, { keepFocus: true });
    }
  }

  /** Whether a conflict matches the filters; its label is checked only when it has one. */
  matches(c) {
    const f = apiFilters(this.filters);
    const created = Date.parse(c.created_at);
    const either = (side) => c.server?.[side] === f[side] || c.incoming?.[side] === f[side];
    return (!f.status || c.status === f.status) && (!f.table || c.table === f.table)
      && (!f.device || either('device')) && (!f.user || either('user')) && (!f.field || c.field === f.field)
      && (!f.label || !c.row_label || c.row_label.toLowerCase().includes(f.label.toLowerCase()))
      && (!f.since || created >= Date.parse(f.since)) && (!f.until || created < Date.parse(f.until));
  }

  onFrame(frame) {
    if (frame.type !== 'conflict' || frame.sub !== CONFLICT_SUB) return;
    const c = frame.conflict;
    if (typeof frame.open === 'number') this.setOpenCount(frame.open);
    const known = this.items.get(c.id);
    if (known) {
      // Updated in place, even if it no longer matches the filter; frames carry no label.
      this.items.set(c.id, { ...c, row_label: c.row_label ?? known.row_label });
    } else if (this.matches(c)) {
      if (!c.row_label && catalog.labelColumn(c.table)) this.labelLater(c);
      else this.items = new Map([[c.id, c], ...this.items]);
    }
    this.renderList();
    if (this.openId === c.id) this.show(c.id, { keepFocus: true });
  }

  /** A new conflict of a labelled table comes in without its label (conflict frames carry
   * none): read it through the API, a few at a time, then list it if it still matches. Past
   * that many waiting, it is listed as it came. */
  labelLater(c) {
    this.labelling ??= new Set();
    if (this.labelling.size >= LABEL_READS) {
      if (!this.filters.label) this.items = new Map([[c.id, c], ...this.items]);
      return;
    }
    this.labelling.add(c.id);
    const api = this.api;
    api.conflict(c.id).then((out) => out.conflict ?? out, () => c).then((full) => {
      this.labelling.delete(c.id);
      if (this.api !== api || this.items.has(c.id)) return;
      const record = full;
      if (!this.matches(record) || (this.filters.label && !record.row_label)) return;
      this.items = new Map([[record.id, record], ...this.items]);
      this.renderList();
    });
  }

  renderList() {
    const items = [...this.items.values()].sort((a, b) => b.id - a.id);
    // Only open conflicts that are shown stay selected.
    this.chosen = new Set([...this.chosen].filter((id) => this.items.get(id)?.status === 'open'));
    replace(this.listEl, items.map((c) => this.item(c)));
    const open = items.filter((c) => c.status === 'open').length;
    $('#bulk').hidden = open === 0 && this.chosen.size === 0;
    $('#bulk-all').checked = open > 0 && this.chosen.size === open;
    $('#bulk-count').textContent = `${this.chosen.size} selected`;
    for (const id of ['#bulk-keep', '#bulk-take-other', '#bulk-dismiss']) $(id).disabled = this.chosen.size === 0;
    this.emptyEl.hidden = items.length > 0;
    this.moreBtn.hidden = this.nextBeforeId === null;
  }

  item(c) {
    const won = c.winner === 'server' ? 'server' : 'incoming';
    const lost = won === 'server' ? 'incoming' : 'server';
    // A side that won by deleting the row has no value: say so.
    const valueOf = (name) => (deleteWon(c) && name === won ? 'deleted' : fieldValue(c, c[name]?.value));
    const pick = c.status === 'open'
      ? h('input', {
        type: 'checkbox',
        class: 'conflict-pick',
        'aria-label': `Select conflict #${c.id}`,
        checked: this.chosen.has(c.id),
        onchange: (e) => {
          if (e.target.checked) this.chosen.add(c.id);
          else this.chosen.delete(c.id);
          this.renderList();
          this.listEl.querySelector(`li[data-id="${c.id}"] .conflict-pick`)?.focus();
        },
      })
      : null;
    return h('li', { class: `conflict-item status-${c.status}${this.openId === c.id ? ' selected' : ''}`, dataset: { id: c.id } },
      pick,
      h('button', {
        type: 'button',
        class: 'conflict-open',
        'aria-controls': 'conflict-detail',
        'aria-expanded': String(this.openId === c.id),
        onclick: () => this.show(c.id),
      },
      // The spaces between the lines keep the button's accessible name readable.
      h('span', { class: 'ci-title' }, `#${c.id} ${rowName(c)} · ${c.field}`), ' ',
      h('span', { class: 'ci-values' }, `${sideWords(c, won)}: ${valueOf(won)} · not kept: ${valueOf(lost)} from ${c[lost]?.device ?? '?'}`), ' ',
      h('span', { class: 'ci-meta' }, h('span', { class: `status status-${c.status}` }, c.status), ' · ', dateTime(c.created_at))));
  }

  close() {
    const id = this.openId;
    this.openId = null;
    writePlace(this.filters, null);
    this.detailEl.hidden = true;
    this.detailEl.replaceChildren();
    this.renderList();
    const opener = this.listEl.querySelector(`li[data-id="${CSS.escape(String(id))}"] button`);
    (opener ?? $('#conflicts-h')).focus();
  }

  /** Open one conflict: read it with its current row and render the side-by-side view. */
  async show(id, { keepFocus = false } = {}) {
    this.openId = id;
    writePlace(this.filters, id);
    this.renderList();
    let data;
    try {
      data = await this.api.conflict(id);
    } catch (err) {
      if (this.openId !== id) return;
      this.detailEl.hidden = false;
      replace(this.detailEl, this.detailHead(id), h('p', { class: 'error', role: 'alert' }, `Could not load conflict #${id}: ${describe(err)}`));
      if (!keepFocus) $('#detail-h').focus();
      return;
    }
    if (this.openId !== id) return;
    if (this.items.has(id)) {
      this.items.set(id, data.conflict);
      this.renderList();
    }
    const hadFocus = this.detailEl.contains(document.activeElement) ? document.activeElement.dataset.focusKey : null;
    this.render(data.conflict, data.current);
    this.detailEl.hidden = false;
    if (hadFocus) this.detailEl.querySelector(`[data-focus-key="${hadFocus}"]`)?.focus();
    else if (!keepFocus) $('#detail-h').focus();
  }

  detailHead(id) {
    return h('div', { class: 'detail-head' },
      h('h3', { id: 'detail-h', tabindex: '-1' }, `Conflict #${id}`),
      h('button', { type: 'button', class: 'small', 'aria-label': `Close conflict #${id}`, 'data-focus-key': 'close', onclick: () => this.close() }, 'Close'));
  }

  render(c, current) {
    const winnerSide = c.winner === 'server' ? 'server' : 'incoming';
    const otherSide = winnerSide === 'server' ? 'incoming' : 'server';
    const side = (name) => {
      const s = c[name] ?? {};
      const won = name === winnerSide;
      return h('section', { class: `side side-${name} ${won ? 'won' : 'lost'}`, 'aria-labelledby': `side-${name}-h` },
        h('h4', { id: `side-${name}-h` }, sideWords(c, name), ' ',
          h('span', { class: 'muted side-role' }, name === 'server' ? '(stored first)' : '(pushed later)')),
        h('p', { class: 'value', dataset: { side: name } }, won && deleteWon(c) ? `deleted by ${s.device ?? '?'}` : fieldValue(c, s.value)),
        dl([
          ['Device', s.device ?? '—'],
          ['User', s.user ?? '—'],
          ['Clock', s.hlc ? [timeEl(s.hlc.wall_ms), ` #${s.hlc.counter}`] : '—'],
          name === 'server' ? ['Version', s.version ?? '—'] : ['Seen version', c.base_version ?? '—'],
        ], 'side-facts'));
    };

    const row = current?.row;
    const currentSection = h('section', { class: 'current', 'aria-labelledby': 'current-h' },
      h('h4', { id: 'current-h' }, row ? `Current row (version ${current.version})` : 'Current row'),
      row
        ? dl(Object.entries(row).map(([col, v]) => [col, col === c.field ? h('strong', {}, catalog.format(c.table, col, v)) : catalog.format(c.table, col, v)]), 'row-facts')
        : h('p', { class: 'muted' }, 'The row no longer exists.'));

    const resultEl = h('p', { class: 'result', role: 'status', tabindex: '-1' });
    const errorEl = h('p', { class: 'error', role: 'alert' });
    let resolveSection;
    if (c.status === 'open') {
      const valueId = `new-value-${c.id}`;
      const busy = (on) => resolveSection.querySelectorAll('button, input').forEach((el) => { el.disabled = on; });
      // A resolution is based on the value this page shows: the hub refuses it (stale_conflict)
      // if the field holds another one by then.
      const seen = row ? { expected: row[c.field] ?? null } : {};
      const act = async (action, label) => {
        if (action.action !== 'dismiss') action = { ...action, ...seen };
        errorEl.textContent = '';
        resultEl.textContent = `Resolving: ${label}…`;
        busy(true);
        try {
          const out = await this.api.resolve(c.id, action);
          const seq = out.result?.seq;
          this.items.set(c.id, out.conflict);
          const written = 'resolved_value' in out.conflict ? ` (${fieldValue(c, out.conflict.resolved_value)})` : '';
          this.lastResult = `Conflict #${c.id} resolved: ${RESOLUTION_TEXT[action.action]}${written}${seq ? `, written as change ${seq}` : ''}.`;
          this.refreshCounts();
          await this.show(c.id, { keepFocus: true });
          const shown = this.detailEl.querySelector('.result');
          if (shown) {
            shown.textContent = this.lastResult;
            shown.focus();
          }
        } catch (err) {
          busy(false);
          resultEl.textContent = '';
          errorEl.textContent = `Could not resolve conflict #${c.id}: ${describe(err)}`;
          if (err instanceof ApiError && err.code === 'conflict_not_open') this.show(c.id, { keepFocus: true });
          if (err instanceof ApiError && err.code === 'stale_conflict') {
            // Show the value the field holds now, and ask again.
            const message = `${c.field} changed since this page showed it; nothing was written. Its current value is shown below: choose again.`;
            await this.show(c.id, { keepFocus: true });
            const shownError = this.detailEl.querySelector('.resolve .error');
            if (shownError) shownError.textContent = message;
          }
        }
      };
      const deviceOf = (side) => c[side]?.device ?? 'the other device';
      const winnerValue = c[winnerSide]?.value;
      const otherValue = c[otherSide]?.value;
      // The row was deleted: it is kept deleted, or restored as it was with the other value.
      const deletedForGood = deleteWon(c) && !row;
      const input = h('input', { id: valueId, name: 'value', autocomplete: 'off', 'aria-describedby': `${valueId}-help`, 'data-focus-key': 'value' });
      resolveSection = deletedForGood ? h('section', { class: 'resolve', 'aria-labelledby': 'resolve-h' },
        h('h4', { id: 'resolve-h' }, 'Resolve'),
        h('p', { class: 'hint' }, `The row was deleted by ${c[winnerSide]?.device ?? '?'}. Keep it deleted, or restore it as it was when deleted, with ${c[otherSide]?.device ?? 'the other device'}'s value.`),
        h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'primary', 'data-focus-key': 'keep', onclick: () => act({ action: 'keep' }, 'keep it deleted') }, 'Keep it deleted'),
          h('button', { type: 'button', 'data-focus-key': 'take_other', onclick: () => act({ action: 'take_other' }, `restore the row with ${deviceOf(otherSide)}'s value`) },
            `Restore it with ${deviceOf(otherSide)}'s value: ${fieldValue(c, otherValue)}`),
          h('button', { type: 'button', 'data-focus-key': 'dismiss', onclick: () => act({ action: 'dismiss' }, 'dismiss') }, 'Dismiss (write nothing)')),
        resultEl,
        errorEl) : h('section', { class: 'resolve', 'aria-labelledby': 'resolve-h' },
        h('h4', { id: 'resolve-h' }, 'Resolve'),
        h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'primary', 'data-focus-key': 'keep', onclick: () => act({ action: 'keep' }, `keep ${deviceOf(winnerSide)}'s value`) },
            `Keep ${deviceOf(winnerSide)}'s value: ${fieldValue(c, winnerValue)}`),
          h('button', { type: 'button', class: 'primary', 'data-focus-key': 'take_other', onclick: () => act({ action: 'take_other' }, `use ${deviceOf(otherSide)}'s value`) },
            `Use ${deviceOf(otherSide)}'s value instead: ${fieldValue(c, otherValue)}`),
          h('button', { type: 'button', 'data-focus-key': 'dismiss', onclick: () => act({ action: 'dismiss' }, 'dismiss') },
            'Dismiss (write nothing)')),
        h('form', {
          class: 'new-value',
          novalidate: true,
          onsubmit: (e) => {
            e.preventDefault();
            if (input.value.trim() === '') {
              errorEl.textContent = 'Type the new value first.';
              input.focus();
              return;
            }
            const value = parseValue(input.value);
            act({ action: 'value', value }, `write ${fieldValue(c, value)}`);
          },
        },
        h('label', { for: valueId }, `New value for ${c.field}`),
        h('p', { id: `${valueId}-help`, class: 'hint' }, 'Read as JSON when it can be (numbers, true, false, null, "quoted text"), else as text.'),
        h('div', { class: 'inline' }, input, h('button', { type: 'submit', 'data-focus-key': 'write' }, 'Write value'))),
        resultEl,
        errorEl);
    } else {
      resultEl.textContent = this.lastResult?.startsWith(`Conflict #${c.id} `) ? this.lastResult : '';
      resolveSection = h('section', { class: 'resolve done', 'aria-labelledby': 'resolve-h' },
        h('h4', { id: 'resolve-h' }, c.status === 'resolved' ? 'Resolved' : 'Dismissed'),
        dl([
          c.resolution ? ['Resolution', RESOLUTION_TEXT[c.resolution] ?? c.resolution] : null,
          c.reviewed_by ? ['By', c.reviewed_by] : null,
          c.reviewed_at ? ['At', timeEl(c.reviewed_at)] : null,
          'resolved_value' in c ? ['Value written', fieldValue(c, c.resolved_value)] : null,
          c.resolution_seq ? ['Written as change', String(c.resolution_seq)] : null,
        ], 'resolution-facts'),
        resultEl,
        errorEl);
    }

    replace(this.detailEl,
      this.detailHead(c.id),
      h('p', { class: 'meta' },
        h('span', { class: `status status-${c.status}` }, c.status), ' ',
        `${c.row_label ? `${c.row_label} · ` : ''}${c.table} · key ${Object.entries(c.key ?? {}).map(([k, v]) => `${k}=${show(v)}`).join(', ')} · field `,
        h('code', {}, c.field), ` · policy ${c.policy} · logged `, timeEl(c.created_at)),
      h('div', { class: 'sides' }, side('server'), side('incoming')),
      currentSection,
      resolveSection);
  }
}

/** The conflict's field value as people read it (money, local time: the table's formats). */
function fieldValue(c, value) {
  return catalog.format(c.table, c.field, value);
}

/** The row a conflict is on: its label (and table) where the table has a label column. */
function rowName(c) {
  return c.row_label ? `${c.row_label} (${c.table})` : c.table;
}

function describe(err) {
  if (err instanceof ApiError) return err.describe();
  return err?.message ?? String(err);
}
