/**
 * A process holding a mount, standing in for the agent in the kill -9 tests:
 *   node --import tsx mount-holder-child.ts JOB.json
 * JOB.json: { stateDir, runBase, grant, walDir } — WAL segments as files in walDir.
 * Mounts, prints the LocalMount as one JSON line, then waits forever (the
 * parent SIGKILLs it; it may also be killed before it prints).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { MountGrant } from '../../agent/mount/mount-port.js';
import { NbdLocalMounter } from '../../agent/mount/nbd-local-mounter.js';

const job = JSON.parse(await readFile(process.argv[2]!, 'utf8')) as { stateDir: string; runBase: string; grant: MountGrant; walDir: string };
const mounter = new NbdLocalMounter({ stateDir: job.stateDir, runBase: job.runBase });
const m = await mounter.mount(job.grant, (_image, name) => readFile(join(job.walDir, name)), {});
process.stdout.write(`${JSON.stringify(m)}\n`);
setInterval(() => {}, 60_000);
