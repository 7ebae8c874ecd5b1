/**
 * A process that owns a tracing instance, for the crash tests:
 *   node --import tsx tracker-owner-child.ts DEVICE hang   → prints the instance name, then waits forever
 *   node --import tsx tracker-owner-child.ts DEVICE exit   → prints the name, drains once, exits WITHOUT stop()
 * The parent kills the first with SIGKILL and checks that the second exits
 * on its own (a trace_pipe read must not keep the process alive).
 */
import { TracefsTracker } from '../../agent/cbt/tracefs/tracefs-tracker.js';

const [device, mode] = process.argv.slice(2);
const tracker = new TracefsTracker();
await tracker.start({ device: device!, chunkSize: 65536, generation: 1 });
process.stdout.write(`${JSON.stringify({ instance: tracker.instanceName })}\n`);
if (mode === 'hang') {
  setInterval(() => {}, 60_000);
} else {
  await tracker.checkpoint();
  // Falls off the end: the event loop must empty and the process exit.
}
