/**
 * The steps of a mount as they are recorded in the state file
 * (mount-state.ts), and how each is released. A release works from the
 * record alone (a killed agent left nothing else), checks that what it is
 * about to release is still the thing recorded (a mount at that exact path,
 * a loop device still backed by our FUSE file, a process with the recorded
 * pid AND start time whose working directory is the data directory), and
 * answers 'absent' for a step never taken or already undone — so releasing
 * twice is harmless.
 */
import { readFile, rm, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import { isAlive, processComm, processCwd } from '../../proto/shared/proc.js';
import { readMountTable } from '../snapshot/fsfreeze.js';
import { detachLoopOf } from './loop-device.js';
import { releaseKernelNbd } from './nbd-client-attacher.js';

export type MountStep =
  /** A directory we created (recursive: one only we write into, e.g. the socket dir). */
  | { kind: 'dir'; path: string; recursive?: boolean }
  /** nbdfuse serving the export as `file` inside the FUSE mount `dir`. */
  | { kind: 'nbdfuse'; dir: string; file: string; pid?: number; startTime?: string | null }
  /** A kernel NBD device connected with nbd-client. */
  | { kind: 'nbd-kernel'; device: string; pid?: number }
  /** A loop device over `backingFile` (the kernel's name for it: a real path). */
  | { kind: 'loop'; backingFile: string; device?: string }
  /** A filesystem mounted at `target`. */
  | { kind: 'fs'; target: string; device: string }
  /** A postmaster on `dataDir`. */
  | { kind: 'postmaster'; dataDir: string; pid?: number; startTime?: string | null };

export type ReleaseOutcome = 'released' | 'absent';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function mountedAt(dir: string): Promise<{ fstype: string } | undefined> {
  const abs = path.resolve(dir);
  return (await readMountTable()).reverse().find((m) => m.mountPoint === abs);
}

/** The postmaster recorded in `step`, or the one postmaster.pid names, if it is a postgres process running in dataDir. */
async function livePostmaster(step: Extract<MountStep, { kind: 'postmaster' }>): Promise<{ pid: number; startTime: string | null } | null> {
  let pid = step.pid;
  let startTime = step.startTime ?? null;
  if (!pid) {
    const first = await readFile(path.join(step.dataDir, 'postmaster.pid'), 'utf8').then((t) => t.split('\n')[0]!.trim(), () => '');
    if (!/^\d+$/.test(first)) return null;
    pid = Number(first);
    startTime = null;
  }
  if (!(await isAlive(pid, startTime))) return null;
  const comm = await processComm(pid);
  const cwd = await processCwd(pid);
  if ((comm !== 'postgres' && comm !== 'postmaster') || cwd === null || path.resolve(cwd) !== path.resolve(step.dataDir)) return null;
  return { pid, startTime };
}

async function waitExit(pid: number, startTime: string | null, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (!(await isAlive(pid, startTime))) return true;
    await sleep(20);
  }
  return !(await isAlive(pid, startTime));
}

/**
 * Fast shutdown (SIGINT, what `pg_ctl stop -m fast` sends: sessions end,
 * a shutdown checkpoint, then exit), then immediate (SIGQUIT) if it hangs.
 * Never SIGKILL: a killed postmaster leaves its backends holding the
 * filesystem, which then cannot be unmounted.
 */
export async function stopPostmaster(step: Extract<MountStep, { kind: 'postmaster' }>, graceMs = 60_000): Promise<ReleaseOutcome> {
  const pm = await livePostmaster(step);
  if (!pm) return 'absent';
  for (const [signal, wait] of [['SIGINT', graceMs], ['SIGQUIT', 30_000]] as const) {
    try {
      process.kill(pm.pid, signal);
    } catch {
      return 'released';
    }
    if (await waitExit(pm.pid, pm.startTime, wait)) return 'released';
  }
  throw new BlocksnapError('E_PG', `postmaster ${pm.pid} on ${step.dataDir} did not stop`);
}

/** umount, retried while the filesystem is busy (a postmaster's last children exit a moment after it). */
async function umount(target: string, timeoutMs = 30_000): Promise<ReleaseOutcome> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (!(await mountedAt(target))) return 'absent';
    const r = await execa('umount', [target], { reject: false, stdin: 'ignore', timeout: 60_000 });
    if (r.exitCode === 0) return 'released';
    if (Date.now() > end) throw new BlocksnapError('E_DEVICE', `umount ${target} failed: ${String(r.stderr).trim()}`, { cause: r });
    await sleep(100);
  }
}

/** fusermount3 -u (nbdfuse then exits by itself); waits for the recorded nbdfuse process to be gone, SIGTERM as a last resort. */
async function releaseNbdfuse(step: Extract<MountStep, { kind: 'nbdfuse' }>): Promise<ReleaseOutcome> {
  let did = false;
  const end = Date.now() + 30_000;
  while (await mountedAt(step.dir)) {
    const r = await execa('fusermount3', ['-u', step.dir], { reject: false, stdin: 'ignore', timeout: 30_000 });
    if (r.exitCode === 0) {
      did = true;
      break;
    }
    if (Date.now() > end) throw new BlocksnapError('E_DEVICE', `fusermount3 -u ${step.dir} failed: ${String(r.stderr).trim()}`, { cause: r });
    await sleep(100);
  }
  if (step.pid && (await isAlive(step.pid, step.startTime ?? null)) && (await processComm(step.pid)) === 'nbdfuse') {
    did = true;
    if (!(await waitExit(step.pid, step.startTime ?? null, 10_000))) {
      process.kill(step.pid, 'SIGTERM');
      if (!(await waitExit(step.pid, step.startTime ?? null, 10_000))) throw new BlocksnapError('E_DEVICE', `nbdfuse ${step.pid} did not exit`);
    }
  }
  return did ? 'released' : 'absent';
}

async function releaseDir(step: Extract<MountStep, { kind: 'dir' }>): Promise<ReleaseOutcome> {
  const abs = path.resolve(step.path);
  // Never recurse into a live mount (an unmount that failed earlier): refuse instead.
  const inside = (await readMountTable()).find((m) => m.mountPoint === abs || m.mountPoint.startsWith(abs + '/'));
  if (inside) throw new BlocksnapError('E_BUSY', `${step.path} still holds the mount ${inside.mountPoint}`);
  try {
    if (step.recursive) await rm(step.path, { recursive: true });
    else await rmdir(step.path);
    return 'released';
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return 'absent';
    throw new BlocksnapError('E_STORE_IO', `cannot remove ${step.path}`, { cause: e });
  }
}

export async function releaseStep(step: MountStep): Promise<ReleaseOutcome> {
  switch (step.kind) {
    case 'postmaster': return stopPostmaster(step);
    case 'fs': return umount(step.target);
    case 'loop': return detachLoopOf(step.backingFile, step.device);
    case 'nbdfuse': return releaseNbdfuse(step);
    case 'nbd-kernel': return releaseKernelNbd(step.device);
    case 'dir': return releaseDir(step);
  }
}

/**
 * Releases `steps` newest first; every step is tried even when one fails
 * (a later one may still free something), then the first failure is thrown.
 */
export async function releaseSteps(steps: MountStep[], onReleased?: (s: MountStep, o: ReleaseOutcome) => void): Promise<void> {
  const errors: unknown[] = [];
  for (const s of [...steps].reverse()) {
    try {
      // Not `onReleased?.(s, await releaseStep(s))`: without a callback the optional call skips its arguments — nothing was released.
      const outcome = await releaseStep(s);
      onReleased?.(s, outcome);
    } catch (e) {
      errors.push(e);
    }
  }
  if (errors.length === 1) throw errors[0];
  if (errors.length > 1) throw new BlocksnapError('E_DEVICE', `${errors.length} mount steps could not be released`, { cause: new AggregateError(errors) });
}
