// synchub-since: gap-free Postgres Changes for supabase-js clients of a synchub hub.
//
// A synchub hub numbers every committed change of a tenant (its `seq`) and sends it in each
// `postgres_changes` message (`data.seq`, `data.epoch`). A channel that joins with
// `since_seq` in a postgres_changes binding gets every change after that seq first, in order,
// then live ones: nothing is lost while the socket was down. supabase-js does not carry the seq
// to your callback (it reshapes the payload to {schema, table, commit_timestamp, eventType,
// new, old, errors}), and its automatic rejoin resends the join payload built at subscribe().
// This module closes that gap:
//
//   - it watches the socket's decoded messages (RealtimeClient.stateChangeCallbacks.message,
//     a public getter) and keeps the last seq (and epoch) seen on each attached channel, from
//     postgres_changes messages and from the `Snapshot complete` system message;
//   - it writes that position into the channel's join payload (RealtimeChannel's public
//     updateJoinPayload, documented as "the payload that will be sent the next time the
//     channel joins"), as `since_seq` / `since_epoch` in every postgres_changes binding, so
//     supabase-js's own rejoin after a dropped connection asks for exactly what it missed;
//   - optionally it persists the position through a storage callback and restores it before
//     the first join, so a reloaded page continues where it stopped.
//
// No dependencies; works with @supabase/supabase-js 2.x (tested with 2.119.2, vsn 1.0.0 and
// 2.0.0) and with a bare @supabase/realtime-js RealtimeClient. Against a plain Supabase server
// the extension keys are ignored and nothing changes.
//
// Usage:
//
//   import { createClient } from '@supabase/supabase-js'
//   import { syncHubSince } from './synchub-since.mjs'
//
//   const supabase = createClient(HUB_URL, token)
//   const since = syncHubSince(supabase, {
//     storage: {                                       // optional
//       get: key => localStorage.getItem(key),         // string | object | null, or a Promise
//       set: (key, value) => localStorage.setItem(key, value),
//       remove: key => localStorage.removeItem(key),   // optional (used by forget())
//     },
//     onPositionLost: (channel, system) => reloadEverything(),  // optional, see below
//   })
//   const channel = supabase
//     .channel('orders')
//     .on('postgres_changes', { event: '*', schema: 'public', table: 'orders' }, apply)
//   await since.attach(channel)   // before subscribe(): restores a stored position
//   channel.subscribe()
//
// Semantics:
//   - At least once, in order: the position advances after your callbacks for a message ran
//     (supabase-js calls channel callbacks before socket message hooks). A callback that throws
//     leaves the position where it was, so the change comes again after a rejoin.
//   - The position is per channel (all its bindings): the hub sends a channel's changes in seq
//     order, so every binding of the channel has had all of its changes up to the last seq seen.
//   - A binding joined with `snapshot: true` rejoins with `since_seq` instead (no second
//     snapshot) once a position is known; pass `keepSnapshot: true` to snapshot again.
//   - When the hub no longer holds the changes after the position (log trimmed, or the hub's
//     epoch changed), it says so with a `system` message (`PositionTooOld: ...` or
//     `EpochMismatch: ...`) and continues live; `onPositionLost(channel, payload)` is called
//     then: reload your data (e.g. rejoin with `snapshot: true`, after `forget(channel)`).
//   - Keep a `snapshot: true` binding and a binding joined with an older `since_seq` in different
//     channels: in one channel the snapshot (at its seq) is sent before the older changes the
//     other binding asked for, so the channel's messages are not in seq order until it caught up.
//   - The storage key defaults to `synchub-since:<topic>` (`key: channel => ...` to change it,
//     e.g. to add the user). Stored values are JSON text `{"seq":123,"epoch":"..."}`.
//     Writes happen on every new position unless `saveEveryMs` batches them.

const REF_PREFIX = 'synchub-since-';
let instances = 0;

/**
 * @param {object} client a SupabaseClient (uses its `.realtime`) or a RealtimeClient
 * @param {{
 *   storage?: { get(key: string): any, set(key: string, value: string): any, remove?(key: string): any },
 *   key?: (channel: object) => string,
 *   keepSnapshot?: boolean,
 *   saveEveryMs?: number,
 *   onPositionLost?: (channel: object, system: object) => void,
 *   onError?: (error: unknown) => void,
 * }} [options]
 */
export function syncHubSince(client, options = {}) {
    const realtime = client && client.realtime ? client.realtime : client;
    if (!realtime || typeof realtime.channel !== 'function' || !realtime.stateChangeCallbacks) {
        throw new TypeError('syncHubSince: pass a SupabaseClient or a RealtimeClient');
    }
    const storage = options.storage || null;
    const keyOf = options.key || (channel => `synchub-since:${channel.topic}`);
    const keepSnapshot = options.keepSnapshot === true;
    const saveEveryMs = Math.max(0, Number(options.saveEveryMs) || 0);
    const onPositionLost = options.onPositionLost || null;
    const onError = options.onError || (err => console.error('synchub-since:', err));
    /** topic → { channel, key, seq, epoch, timer, dirty } */
    const tracked = new Map();
    const ref = `${REF_PREFIX}${++instances}`;

    function report(err) {
        try {
            onError(err);
        } catch (e) {
            // nothing more to do
        }
    }

    function withPosition(binding, entry) {
        const next = { ...binding, since_seq: entry.seq };
        if (entry.epoch) {
            next.since_epoch = entry.epoch;
        } else {
            delete next.since_epoch;
        }
        if (!keepSnapshot) {
            delete next.snapshot;
        }
        return next;
    }

    /** Put the position into the bindings (read by a later subscribe()) and the join payload. */
    function apply(entry) {
        if (entry.seq === null) {
            return;
        }
        const channel = entry.channel;
        const bindings = channel.bindings && channel.bindings.postgres_changes;
        if (Array.isArray(bindings)) {
            for (const binding of bindings) {
                binding.filter = withPosition(binding.filter || {}, entry);
            }
        }
        const push = channel.joinPush;
        const payload = push && typeof push.payload === 'function' ? push.payload() : null;
        const config = payload && payload.config;
        if (config && Array.isArray(config.postgres_changes) && config.postgres_changes.length) {
            channel.updateJoinPayload({
                config: { ...config, postgres_changes: config.postgres_changes.map(b => withPosition(b, entry)) }
            });
        }
    }

    function writeNow(entry) {
        if (entry.timer) {
            clearTimeout(entry.timer);
            entry.timer = null;
        }
        if (!storage || !entry.dirty) {
            return;
        }
        entry.dirty = false;
        try {
            const done = storage.set(entry.key, JSON.stringify({ seq: entry.seq, epoch: entry.epoch }));
            if (done && typeof done.catch === 'function') {
                done.catch(report);
            }
        } catch (err) {
            report(err);
        }
    }

    function save(entry) {
        if (!storage) {
            return;
        }
        entry.dirty = true;
        if (saveEveryMs === 0) {
            writeNow(entry);
        } else if (!entry.timer) {
            entry.timer = setTimeout(() => writeNow(entry), saveEveryMs);
        }
    }

    function advance(entry, seq, epoch) {
        const sameEpoch = !epoch || !entry.epoch || epoch === entry.epoch;
        if (entry.seq !== null && sameEpoch && seq <= entry.seq) {
            return;
        }
        entry.seq = seq;
        if (epoch) {
            entry.epoch = epoch;
        }
        apply(entry);
        save(entry);
    }

    function observe(message) {
        if (!message || typeof message !== 'object') {
            return;
        }
        const entry = tracked.get(message.topic);
        const payload = message.payload;
        if (!entry || !payload || typeof payload !== 'object') {
            return;
        }
        if (message.event === 'postgres_changes') {
            const data = payload.data;
            if (data && Number.isSafeInteger(data.seq)) {
                advance(entry, data.seq, typeof data.epoch === 'string' ? data.epoch : null);
            }
        } else if (message.event === 'system' && payload.extension === 'postgres_changes') {
            if (payload.status === 'ok' && Number.isSafeInteger(payload.seq)) {
                // `Snapshot complete` carries the snapshot's seq (an empty snapshot has no rows).
                advance(entry, payload.seq, typeof payload.epoch === 'string' ? payload.epoch : null);
            } else if (payload.status === 'error' && /^(PositionTooOld|EpochMismatch)\b/.test(String(payload.message))) {
                if (onPositionLost) {
                    try {
                        onPositionLost(entry.channel, payload);
                    } catch (err) {
                        report(err);
                    }
                }
            }
        }
    }

    realtime.stateChangeCallbacks.message.push([ref, observe]);

    function parseStored(value) {
        if (value === null || value === undefined || value === '') {
            return null;
        }
        let parsed = value;
        if (typeof value === 'string') {
            try {
                parsed = JSON.parse(value);
            } catch (err) {
                return null;
            }
        }
        if (!parsed || typeof parsed !== 'object' || !Number.isSafeInteger(parsed.seq) || parsed.seq < 0) {
            return null;
        }
        return { seq: parsed.seq, epoch: typeof parsed.epoch === 'string' ? parsed.epoch : null };
    }

    return {
        /**
         * Track `channel` (a RealtimeChannel). Restores its stored position, if any, into its
         * postgres_changes bindings: call it before `channel.subscribe()` and await it.
         * Resolves to the position `{seq, epoch}` or null.
         */
        async attach(channel) {
            if (!channel || typeof channel.topic !== 'string') {
                throw new TypeError('syncHubSince.attach: pass a RealtimeChannel');
            }
            let entry = tracked.get(channel.topic);
            if (!entry || entry.channel !== channel) {
                entry = { channel, key: keyOf(channel), seq: null, epoch: null, timer: null, dirty: false };
                tracked.set(channel.topic, entry);
            }
            if (entry.seq === null && storage) {
                const stored = parseStored(await storage.get(entry.key));
                if (stored && entry.seq === null) {
                    entry.seq = stored.seq;
                    entry.epoch = stored.epoch;
                }
            }
            apply(entry);
            return entry.seq === null ? null : { seq: entry.seq, epoch: entry.epoch };
        },

        /** The last position seen on `channel` (or restored for it): `{seq, epoch}` or null. */
        position(channel) {
            const entry = tracked.get(channel.topic);
            return entry && entry.seq !== null ? { seq: entry.seq, epoch: entry.epoch } : null;
        },

        /** Stop tracking `channel` (its stored position stays). */
        detach(channel) {
            const entry = tracked.get(channel.topic);
            if (entry && entry.channel === channel) {
                writeNow(entry);
                tracked.delete(channel.topic);
            }
        },

        /**
         * Drop the position of `channel` (memory and storage): its next join starts live (or with
         * its snapshot, if the binding asks for one).
         */
        async forget(channel) {
            const entry = tracked.get(channel.topic);
            const key = entry ? entry.key : keyOf(channel);
            if (entry) {
                if (entry.timer) {
                    clearTimeout(entry.timer);
                    entry.timer = null;
                }
                entry.seq = null;
                entry.epoch = null;
                entry.dirty = false;
                const bindings = channel.bindings && channel.bindings.postgres_changes;
                if (Array.isArray(bindings)) {
                    for (const binding of bindings) {
                        const { since_seq, since_epoch, ...rest } = binding.filter || {};
                        binding.filter = rest;
                    }
                }
                const payload = channel.joinPush && channel.joinPush.payload();
                const config = payload && payload.config;
                if (config && Array.isArray(config.postgres_changes)) {
                    channel.updateJoinPayload({
                        config: {
                            ...config,
                            postgres_changes: config.postgres_changes.map(({ since_seq, since_epoch, ...rest }) => rest)
                        }
                    });
                }
            }
            if (storage) {
                if (typeof storage.remove === 'function') {
                    await storage.remove(key);
                } else {
                    await storage.set(key, '');
                }
            }
        },

        /** Stop watching the socket; pending writes are flushed. */
        close() {
            for (const entry of tracked.values()) {
                writeNow(entry);
            }
            tracked.clear();
            const callbacks = realtime.stateChangeCallbacks;
            callbacks.message = callbacks.message.filter(([r]) => r !== ref);
        }
    };
}

export default syncHubSince;
