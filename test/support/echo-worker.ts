/**
 * A worker thread for test/proto/worker-slots.test.ts: says it is ready (with
 * its workerData), doubles `value`, fails or exits when told to.
 */
import { parentPort, workerData } from 'node:worker_threads';

parentPort!.postMessage({ ready: true, workerData });
parentPort!.on('message', (m: { seq: number; op: 'double' | 'throw' | 'exit'; value: number }) => {
  if (m.op === 'throw') throw new Error('boom');
  if (m.op === 'exit') process.exit(7);
  parentPort!.postMessage({ seq: m.seq, value: m.value * 2 });
});
