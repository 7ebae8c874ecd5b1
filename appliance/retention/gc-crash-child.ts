/**
 * A process that runs retention on a data directory and kills itself with
 * SIGKILL at its K-th durable step (the kill -9 tests of GC and prune,
 * test/store/gc-crash.test.ts): `node gc-crash-child.js DATA OP KILL_AT`, OP one of
 * `prune-gc` (prune --keep-last 5, then gc) or `gc`; KILL_AT 0 runs to the
 * end and prints the step count as JSON.
 */
import pino from 'pino';
import { StoreRig } from './store-rig.js';

const [dataDir, op, killAtArg] = process.argv.slice(2);
const killAt = Number(killAtArg ?? 0);
let steps = 0;
const names: string[] = [];
const step = (name: string) => {
  steps++;
  names.push(name);
  if (steps === killAt) process.kill(process.pid, 'SIGKILL');
};

const rig = await StoreRig.open(dataDir!, { targetPackSize: 64 * 1024, logger: pino({ level: 'silent' }), retention: { step } });
if (op === 'prune-gc') await rig.retention.prune({ keep: { last: 5 } });
await rig.retention.gc({});
await rig.close();
process.stdout.write(JSON.stringify({ steps, names }) + '\n');
