// synchub console: sign-in, the dashboard socket, and the panels (conflicts for managers,
// live change feed, presence), plus broadcast banners.

import { $, h, replace, dateTime } from './dom.js';
import { savedToken, saveToken, forgetToken, describeToken } from './token.js';
import { Api, ApiError } from './api.js';
import { HubSocket } from './hub.js';
import { Feed, forgetSubscriptions } from './feed.js';
import { Presence, PRESENCE_SUB } from './presence.js';
import { Conflicts, CONFLICT_SUB } from './conflicts.js';
import { catalog } from './catalog.js';
import { Operations } from './operations.js';

const DEFAULT_CONFIG = {
  claims: { tenant: 'tenant_id', user: 'sub', role: 'role', device: 'device_id' },
  tables: [],
  manager_roles: ['Manager'],
};
const MAX_BANNERS = 5;
/** How long before its token expires the console asks for a fresh one, ms. */
const EXPIRY_WARNING_MS = 5 * 60 * 1000;
/** The longest timer a browser keeps (about 24.8 days); later moments are re-armed. */
const MAX_TIMER_MS = 2 ** 31 - 1;

let config = DEFAULT_CONFIG;
let session = null; // {token, identity, api, socket, isManager, feed, presence, conflicts}
let panels = null; // {feed, presence, conflicts}: made once, bound to each new session

async function loadConfig() {
  try {
    const res = await fetch('/console/config.json', { cache: 'no-store' });
    if (res.ok) config = { ...DEFAULT_CONFIG, ...(await res.json()) };
  } catch {
    // the defaults match the hub's default claim names
  }
  replace($('#tables'), (config.tables ?? []).map((t) => h('option', { value: t })));
}

function setConn(text, state) {
  $('#conn-text').textContent = text;
  $('#conn').dataset.state = state;
}

function showSignIn(message = '') {
  $('#sign-in').hidden = false;
  $('#workspace').hidden = true;
  $('#who').hidden = true;
  $('#sign-out').hidden = true;
  $('#retry').hidden = true;
  $('#badge').hidden = true;
  $('#sign-in-error').textContent = message;
  setConn('Not signed in', 'out');
  $('#token').focus();
}

/** End the session. A refused token stays in the text box (not in storage) to be fixed or replaced. */
function signOut(message = '', keepText = false) {
  if (session) {
    session.socket.stop();
    session.timers.forEach(clearTimeout);
    session.operations.bind(null);
    session = null;
  }
  $('#renew').hidden = true;
  forgetToken();
  if (!keepText) $('#token').value = '';
  showSignIn(message);
}

/** Who a pasted token says it is; throws an Error that says what is wrong with it. */
function identityOf(token) {
  if (!token) throw new Error('Paste a token first.');
  const identity = describeToken(token, config.claims);
  if (identity.expiresAt && identity.expiresAt.getTime() < Date.now()) {
    throw new Error(`This token expired on ${dateTime(identity.expiresAt)}. Paste a fresh one.`);
  }
  return identity;
}

async function signIn(token) {
  token = token.trim();
  let identity;
  try {
    identity = identityOf(token);
  } catch (err) {
    $('#sign-in-error').textContent = err.message;
    $('#token').focus();
    return;
  }
  if (session) {
    session.socket.stop();
    session.timers.forEach(clearTimeout);
  }
  saveToken(token);

  const api = new Api(token);
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/ws`;
  const s = { token, identity, api, timers: [] };
  session = s;
  s.socket = new HubSocket(url, token, {
    status: (state, detail) => onStatus(s, state, detail),
    welcome: (frame, reconnected) => onWelcome(s, frame, reconnected),
    frame: (frame) => onFrame(s, frame),
    refused: (spec, err) => onRefused(s, spec, err),
  });
  Object.assign(s, panels, { isManager: false });
  s.feed.bind(s.socket);
  s.presence.reset();
  s.conflicts.bind(api);
  // The tables and columns the forms offer, and how values read (any role may ask); the
  // console's own table list stands in when the hub cannot say.
  const catalogRead = api.catalog().then((body) => catalog.set(body), () => {}).then(() => {
    if (session !== s) return;
    s.feed.offerTables(config.tables ?? []);
    const names = catalog.names().length ? catalog.names() : config.tables ?? [];
    replace($('#tables'), names.map((t) => h('option', { value: t })));
  });
  s.operations.bind(api);

  renderIdentity(identity);
  watchExpiry(s);
  $('#sign-in').hidden = true;
  $('#sign-in-error').textContent = '';
  $('#workspace').hidden = false;
  $('#sign-out').hidden = false;

  // The conflict API says whether this token may review conflicts (403 for other roles).
  setConn('Checking the token…', 'connecting');
  try {
    const counts = await api.counts();
    if (session !== s) return;
    s.isManager = true;
    s.conflicts.enable();
    s.operations.enable();
    s.conflicts.setOpenCount(counts.open);
    s.socket.subscribe({ sub: CONFLICT_SUB, channel: 'conflicts' }).catch(() => {});
    await catalogRead;
    if (session !== s) return;
    s.conflicts.load();
  } catch (err) {
    if (session !== s) return;
    if (err instanceof ApiError && (err.code === 'invalid_token' || err.code === 'token_expired')) {
      signOut(`The hub refused this token: ${err.describe()}`, true);
      return;
    }
    const managerRole = (config.manager_roles ?? ['Manager']).includes(identity.role);
    if (err instanceof ApiError && err.code === 'forbidden') {
      s.conflicts.disable(); // not a manager role: feed and presence only
    } else if (managerRole) {
      s.conflicts.enable();
      $('#badge').hidden = true; // no count to show
      s.conflicts.note(`Conflict review is unavailable: ${err instanceof ApiError ? err.describe() : err.message}`);
    }
  }
  s.socket.subscribe({ sub: PRESENCE_SUB, channel: 'presence' }).catch((err) => s.presence.unavailable(`Presence is unavailable: ${err.message} (${err.code}).`));
  s.socket.start();
  $('#main').focus();
}

function renderIdentity(id) {
  const parts = [
    ['Tenant', id.tenant ?? '(none)'],
    ['User', id.user ?? '(none)'],
    ['Role', id.role ?? '(none)'],
  ];
  if (id.expiresAt) parts.push(['Expires', dateTime(id.expiresAt)]);
  replace($('#who'), parts.map(([k, v], i) => [i ? ' · ' : '', h('span', { class: 'muted' }, `${k} `), h('span', { class: 'who-value' }, v)]));
  $('#who').hidden = false;
}

/** Run `fn` at `at` (ms since the epoch), as long as `s` is the session. */
function at(s, when, fn) {
  const wait = when - Date.now();
  const timer = setTimeout(() => {
    if (session !== s) return;
    if (wait > MAX_TIMER_MS) at(s, when, fn);
    else fn();
  }, Math.max(0, Math.min(wait, MAX_TIMER_MS)));
  s.timers.push(timer);
}

/** Ask for a fresh token ahead of the expiry, and say when the token in force has expired. */
function watchExpiry(s) {
  s.timers.forEach(clearTimeout);
  s.timers = [];
  $('#renew').hidden = true;
  const expires = s.identity.expiresAt?.getTime();
  if (!expires) return;
  at(s, expires - EXPIRY_WARNING_MS, () => {
    $('#renew-when').textContent = `This token expires at ${dateTime(s.identity.expiresAt)}. Paste a fresh one to stay signed in; the page stays as it is.`;
    $('#renew').hidden = false;
  });
  at(s, expires, () => {
    $('#renew-when').textContent = `This token expired at ${dateTime(s.identity.expiresAt)}. Paste a fresh one now; the hub closes the connection shortly.`;
    setConn('Token expired: paste a fresh one', 'error');
  });
}

/** Replace the session's token with a fresh one of the same tenant and user: on the open
 * socket (protocol `auth`), for the API, for reconnects and for a reload. */
async function renew(s, token) {
  token = token.trim();
  let identity;
  try {
    identity = identityOf(token);
  } catch (err) {
    $('#renew-error').textContent = err.message;
    return;
  }
  if (identity.tenant !== s.identity.tenant || identity.user !== s.identity.user) {
    $('#renew-error').textContent = `The fresh token is for ${identity.user ?? '?'} of ${identity.tenant ?? '?'}; this page is ${s.identity.user} of ${s.identity.tenant}. Sign out to change user.`;
    return;
  }
  try {
    await s.socket.request({ type: 'auth', token });
  } catch (err) {
    // Offline: the fresh token is used when the socket says hello again.
    if (err.code !== 'not_connected') {
      $('#renew-error').textContent = `The hub refused the fresh token: ${err.message} (${err.code}).`;
      return;
    }
  }
  if (session !== s) return;
  Object.assign(s, { token, identity });
  s.socket.token = token;
  s.api.token = token;
  saveToken(token);
  renderIdentity(identity);
  $('#renew-token').value = '';
  $('#renew-error').textContent = '';
  if (s.socket.welcomed) setConn('Live', 'open');
  watchExpiry(s);
}

function onStatus(s, state, detail) {
  if (session !== s) return;
  $('#retry').hidden = state !== 'waiting';
  if (state === 'connecting') {
    setConn(detail.attempt ? `Reconnecting (attempt ${detail.attempt + 1})…` : 'Connecting…', 'connecting');
  } else if (state === 'open') {
    setConn('Live', 'open');
  } else if (state === 'waiting') {
    setConn(`Offline (${detail.reason}); retrying in ${Math.ceil(detail.delayMs / 1000)} s`, 'waiting');
    s.presence.stale();
  } else if (state === 'stopped') {
    if (detail.code === 4001 || detail.code === 4002) {
      signOut(`${detail.reason} Sign in with a fresh token.`, detail.code === 4001);
    } else {
      setConn(`Disconnected: ${detail.reason}`, 'stopped');
    }
  }
}

function onWelcome(s, frame, reconnected) {
  s.presence.setOwnSession(frame.session_id);
  if (reconnected) {
    s.feed.reconnected();
    if (s.isManager) {
      // `conflict` frames sent while the console was away are lost: read the state again.
      s.conflicts.refreshCounts();
      s.conflicts.load();
    }
  }
}

function onFrame(s, frame) {
  if (session !== s) return;
  switch (frame.type) {
    case 'subscribed':
    case 'sub_rows':
    case 'sub_delta':
      s.feed.onFrame(frame);
      break;
    case 'presence':
    case 'presence_diff':
      s.presence.onFrame(frame);
      break;
    case 'conflict':
      s.conflicts.onFrame(frame);
      break;
    case 'broadcast':
      showBanner(frame);
      break;
    case 'error':
      // Errors with an id are reported by the request that caused them.
      if (frame.id === undefined) setConn(`Hub error: ${frame.message} (${frame.code})`, 'error');
      break;
    default:
      break; // frames this console does not use (protocol: ignore unknown types)
  }
}

function onRefused(s, spec, err) {
  if (spec.sub === PRESENCE_SUB) s.presence.unavailable(`Presence is unavailable: ${err.message} (${err.code}).`);
  else if (spec.sub === CONFLICT_SUB) s.conflicts.note(`Live conflict updates are unavailable: ${err.message} (${err.code}).`);
  else s.feed.refused(spec, err);
}

function showBanner(frame) {
  const payload = frame.payload;
  const text = payload && typeof payload === 'object' && typeof payload.text === 'string' ? payload.text : JSON.stringify(payload);
  const level = payload && typeof payload === 'object' && ['info', 'warning', 'error'].includes(payload.level) ? payload.level : 'info';
  const banners = $('#banners');
  const dismiss = () => {
    const next = banner.nextElementSibling ?? banner.previousElementSibling;
    const hadFocus = banner.contains(document.activeElement);
    banner.remove();
    if (hadFocus) (next?.querySelector('button') ?? $('#main')).focus();
  };
  const banner = h('div', { class: `banner level-${level}`, role: level === 'info' ? 'status' : 'alert',
    onkeydown: (e) => { if (e.key === 'Escape') { e.preventDefault(); dismiss(); } } },
  h('p', {}, h('strong', {}, `${frame.channel}: `), text),
  h('button', { type: 'button', class: 'small', 'aria-label': `Dismiss the message on ${frame.channel}`, onclick: dismiss }, 'Dismiss'));
  banners.prepend(banner);
  while (banners.childElementCount > MAX_BANNERS) banners.lastElementChild.remove();
}

async function main() {
  panels = { feed: new Feed(), presence: new Presence(), conflicts: new Conflicts(), operations: new Operations() };
  $('#sign-in-form').addEventListener('submit', (e) => {
    e.preventDefault();
    signIn($('#token').value);
  });
  $('#token').addEventListener('keydown', (e) => {
    // Enter signs in (a token has no line breaks); Shift+Enter is left alone.
    if (e.key === 'Enter' && !e.shiftKey) {
      e.preventDefault();
      $('#sign-in-form').requestSubmit();
    }
  });
  // Signing out forgets the tab's subscriptions too; a token that expired keeps them (and the
  // review's place, in the URL) for the fresh token pasted next.
  $('#sign-out').addEventListener('click', () => {
    forgetSubscriptions();
    signOut();
  });
  $('#retry').addEventListener('click', () => session?.socket.retryNow());
  $('#renew-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (session) renew(session, $('#renew-token').value);
  });
  await loadConfig();
  const token = savedToken();
  if (token) {
    $('#token').value = token;
    signIn(token);
  } else {
    showSignIn();
  }
}

main();
