import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../../proto/errors.js';
import { isAlive } from '../../../proto/shared/proc.js';

/**
 * Naming, creation and removal of tracefs instances owned by blocksnap.
 *
 * Name: `blocksnap-<pid>-<starttime>-<major>_<minor>-<seq>`
 *   pid, starttime  the owning agent process and its start time in clock
 *                   ticks since boot (/proc/<pid>/stat field 22). A pid can
 *                   be reused after a crash; pid + start time cannot, so a
 *                   stale instance is never mistaken for a live one and a
 *                   live one never for a stale one.
 *   major_minor     the traced device, for humans reading `ls instances/`.
 *   seq             per-process counter: restarts within one process.
 * Anything under instances/ that does not parse as this name is not ours
 * and is never touched.
 */
export const INSTANCE_PREFIX = 'blocksnap-';
const DEFAULT_ROOT = '/sys/kernel/tracing';

export interface InstanceOwner {
  pid: number;
  startTime: number;
  major: number;
  minor: number;
  seq: number;
}

export function formatInstanceName(o: InstanceOwner): string {
  return `${INSTANCE_PREFIX}${o.pid}-${o.startTime}-${o.major}_${o.minor}-${o.seq}`;
}

export function parseInstanceName(name: string): InstanceOwner | null {
  if (!name.startsWith(INSTANCE_PREFIX)) return null;
  const parts = name.slice(INSTANCE_PREFIX.length).split('-');
  if (parts.length !== 4) return null;
  const dev = parts[2]!.split('_');
  const nums = [parts[0], parts[1], dev[0], dev[1], parts[3]];
  if (dev.length !== 2 || !nums.every((p) => p !== undefined && /^[0-9]+$/.test(p))) return null;
  const [pid, startTime, major, minor, seq] = nums.map(Number) as [number, number, number, number, number];
  return { pid, startTime, major, minor, seq };
}

/** The tracefs mount point; mounts it at /sys/kernel/tracing when absent and allowed. */
export async function tracefsRoot(opts: { mount?: boolean } = {}): Promise<string> {
  const mounts = await fsp.readFile('/proc/mounts', 'utf8');
  const points = mounts
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[2] === 'tracefs')
    .map((f) => f[1]!);
  if (points.includes(DEFAULT_ROOT)) return DEFAULT_ROOT;
  if (points.length > 0) return points[0]!;
  if (opts.mount === false) throw new BlocksnapError('E_TRACKER', 'tracefs is not mounted');
  try {
    await execa('mount', ['-t', 'tracefs', 'none', DEFAULT_ROOT]);
  } catch (e) {
    // Another process may have mounted it at the same moment.
    const again = await fsp.readFile('/proc/mounts', 'utf8');
    if (!again.includes(` ${DEFAULT_ROOT} tracefs `)) {
      throw new BlocksnapError('E_TRACKER', `cannot mount tracefs at ${DEFAULT_ROOT}`, { cause: e });
    }
  }
  return DEFAULT_ROOT;
}

/** Removes one instance directory; missing is fine. Retries briefly while files close. */
export async function removeInstance(root: string, name: string): Promise<void> {
  if (parseInstanceName(name) === null) {
    throw new BlocksnapError('E_INTERNAL', `refusing to remove foreign tracing instance ${name}`);
  }
  const dir = path.join(root, 'instances', name);
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.rmdir(dir);
      return;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code === 'EBUSY' && attempt < 50) {
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
      throw new BlocksnapError('E_TRACKER', `cannot remove tracing instance ${name}: ${(e as Error).message}`, {
        cause: e,
      });
    }
  }
}

/** Names of every blocksnap instance currently present. */
export async function listInstances(root: string): Promise<string[]> {
  const names = await fsp.readdir(path.join(root, 'instances'));
  return names.filter((n) => parseInstanceName(n) !== null).sort();
}

/**
 * Removes the blocksnap instances whose owning process is gone (dead, or its
 * pid now belongs to a process with another start time). Instances of live
 * agents — including other agents on this machine — and instances that are
 * not blocksnap's are left alone. Returns the names removed.
 */
export async function cleanupStaleInstances(
  opts: { root?: string; filter?: (name: string, owner: InstanceOwner) => boolean } = {},
): Promise<string[]> {
  const root = opts.root ?? (await tracefsRoot({ mount: false }).catch(() => null));
  if (root === null) return [];
  const removed: string[] = [];
  for (const name of await listInstances(root)) {
    const owner = parseInstanceName(name)!;
    // Tests narrow the sweep to what they created: other runs on this machine
    // may be inspecting their own stale instances at the same moment.
    if (opts.filter && !opts.filter(name, owner)) continue;
    if (await isAlive(owner.pid, owner.startTime)) continue;
    await removeInstance(root, name);
    removed.push(name);
  }
  return removed;
}

/** Sums of the per-CPU ring buffer loss counters (per_cpu/cpuN/stats). */
export interface LossCounters {
  overrun: number;
  commitOverrun: number;
  dropped: number;
}

/**
 * Reads every CPU's stats of an instance. `overrun` counts events
 * overwritten before being read (overwrite mode), `dropped events` events
 * refused because the buffer was full (no-overwrite mode), `commit overrun`
 * events lost to nested writers wrapping the buffer.
 */
export async function readLossCounters(instanceDir: string): Promise<LossCounters> {
  const out: LossCounters = { overrun: 0, commitOverrun: 0, dropped: 0 };
  const cpus = (await fsp.readdir(path.join(instanceDir, 'per_cpu'))).filter((n) => /^cpu[0-9]+$/.test(n));
  for (const cpu of cpus) {
    const text = await fsp.readFile(path.join(instanceDir, 'per_cpu', cpu, 'stats'), 'utf8');
    for (const line of text.split('\n')) {
      const colon = line.indexOf(':');
      if (colon < 0) continue;
      const key = line.slice(0, colon).trim();
      const value = Number(line.slice(colon + 1).trim());
      if (!Number.isFinite(value)) continue;
      if (key === 'overrun') out.overrun += value;
      else if (key === 'commit overrun') out.commitOverrun += value;
      else if (key === 'dropped events') out.dropped += value;
    }
  }
  return out;
}

const BIO_EVENT = 'events/block/block_bio_queue';

/**
 * Sets up a fresh instance: per-CPU buffer size, a clock that is monotonic
 * across CPUs (the drain barrier relies on trace_pipe's timestamp order),
 * and the event filter, read back to be sure the kernel took it as written.
 */
export async function configureInstance(dir: string, opts: { bufferSizeKb: number; filter: string }): Promise<void> {
  await writeTracefs(path.join(dir, 'buffer_size_kb'), String(opts.bufferSizeKb));
  await writeTracefs(path.join(dir, 'trace_clock'), 'mono').catch(() => writeTracefs(path.join(dir, 'trace_clock'), 'global'));
  const filterFile = path.join(dir, BIO_EVENT, 'filter');
  await writeTracefs(filterFile, opts.filter);
  const applied = (await fsp.readFile(filterFile, 'utf8')).trim();
  if (applied !== opts.filter) throw new BlocksnapError('E_TRACKER', `event filter not applied: read back "${applied}"`);
}

export async function setEventEnabled(dir: string, on: boolean): Promise<void> {
  await writeTracefs(path.join(dir, BIO_EVENT, 'enable'), on ? '1' : '0');
  if (on) await writeTracefs(path.join(dir, 'tracing_on'), '1');
}

async function writeTracefs(file: string, value: string): Promise<void> {
  try {
    await fsp.writeFile(file, value);
  } catch (e) {
    throw new BlocksnapError('E_TRACKER', `cannot write "${value}" to ${file}: ${(e as Error).message}`, { cause: e });
  }
}
