import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { waitFor } from './wait-for.js';

/** A one-line write to `file` in a child process; `done` resolves true when it completed. */
export interface WriteProbe {
  pid: number;
  done: Promise<boolean>;
}

export function startWriteProbe(file: string): WriteProbe {
  const child = spawn('sh', ['-c', 'printf probe > "$1"', 'sh', file], { stdio: 'ignore' });
  const done = new Promise<boolean>((resolve) => child.on('exit', (code) => resolve(code === 0)));
  return { pid: child.pid!, done };
}

/**
 * Whether the process sleeps on a frozen filesystem's write lock: opening a
 * file for writing on a frozen filesystem waits in sb_start_write, which the
 * kernel shows as wchan percpu_rwsem_wait (measured on this kernel with
 * fsfreeze -f: state D, stack mnt_want_write → percpu_rwsem_wait).
 */
export async function sleepsOnFreeze(pid: number): Promise<boolean> {
  const wchan = await readFile(`/proc/${pid}/wchan`, 'utf8').catch(() => '');
  return wchan === 'percpu_rwsem_wait';
}

/**
 * What became of a write: 'done' if it completed, 'blocked' once it is seen
 * waiting for the freeze lock — a positive signal, not "not done after N ms".
 * Throws if neither happens within `timeoutMs`.
 */
export async function writeOutcome(p: WriteProbe, timeoutMs = 10_000): Promise<'done' | 'blocked' | 'failed'> {
  let finished: boolean | undefined;
  void p.done.then((ok) => (finished = ok));
  await waitFor(`write probe ${p.pid} to finish or block on the freeze`, async () => finished !== undefined || (await sleepsOnFreeze(p.pid)), { timeoutMs, everyMs: 5 });
  if (finished === undefined) return 'blocked';
  return finished ? 'done' : 'failed';
}
