// The JSON-line loop of the Node drivers the tests start (tests/common/driver.rs is the Rust
// side): one command per line on stdin, `{id, cmd, ...}`, answered by one line on stdout,
// `{id, ok, result}` or `{id, ok: false, error}`. stdout carries these lines only: console
// output goes to stderr. No dependencies.
import readline from 'node:readline';

const protocolOut = process.stdout;
console.log = (...args) => console.error(...args);
console.info = (...args) => console.error(...args);
console.debug = (...args) => console.error(...args);
console.warn = (...args) => console.error(...args);

/** Write one line of the protocol. */
export function send(message) {
    protocolOut.write(JSON.stringify(message) + '\n');
}

async function handle(commands, line) {
    let cmd;
    try {
        cmd = JSON.parse(line);
    } catch (err) {
        send({ id: null, ok: false, error: `not a JSON command: ${line.slice(0, 200)}` });
        return;
    }
    const run = commands[cmd.cmd];
    if (!run) {
        send({ id: cmd.id, ok: false, error: `unknown command ${JSON.stringify(cmd.cmd)}` });
        return;
    }
    try {
        const result = await run(cmd);
        send({ id: cmd.id, ok: true, result: result === undefined ? null : result });
    } catch (err) {
        send({ id: cmd.id, ok: false, error: `${cmd.cmd}: ${err && err.message ? err.message : String(err)}` });
    }
}

/** Run `commands` (name → async function of the command) until stdin closes. */
export function serve(commands) {
    const input = readline.createInterface({ input: process.stdin });
    input.on('line', line => {
        if (line.trim()) {
            handle(commands, line);
        }
    });
    // The test went away: nothing is left to drive.
    input.on('close', () => process.exit(0));
    send({ ready: true });
}
