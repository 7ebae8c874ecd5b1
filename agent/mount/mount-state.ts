/**
 * The per-mount state file, `STATE/mounts/<mountId>.json`: every step of a
 * mount is appended here durably (proto/shared/durable-file.ts) BEFORE it is
 * taken, and completed with what it produced (device, pid + start time)
 * right after. A killed agent therefore leaves a file naming everything that
 * may exist; `cleanupOrphans` releases it in reverse order from this file
 * alone. A step recorded but never taken releases as "absent".
 *
 *   { "format": "blocksnap-mount", "version": 1,
 *     "mountId": "…", "imageId": "…", "stateDir": "/var/lib/blocksnap-agent",
 *     "owner": { "pid": 1234, "startTime": "98765", "bootId": "…" },
 *     "createdAt": "ISO-8601", "ready": false,
 *     "target": "/…", "dataDir": "/…", "pgPort": 5433, "connection": "…",
 *     "secondsToFirstQuery": 1.02,
 *     "steps": [ { "kind": "dir", "path": "/…" }, { "kind": "nbdfuse", … }, … ] }
 *
 * `stateDir` is the agent's own: a file copied from another agent's state
 * directory is not ours and is left alone. `owner` is the process holding the
 * mount: while it lives (same pid AND start time, same boot) the mount is not
 * an orphan.
 */
import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';
import { bootId, isAlive, processStartTime } from '../../proto/shared/proc.js';
import type { MountStep } from './mount-steps.js';

export const MOUNT_STATE_FORMAT = 'blocksnap-mount';

export interface MountOwner {
  pid: number;
  startTime: string | null;
  bootId: string | null;
}

export interface MountState {
  format: typeof MOUNT_STATE_FORMAT;
  version: 1;
  mountId: string;
  imageId: string;
  stateDir: string;
  owner: MountOwner;
  createdAt: string;
  /** True once PostgreSQL answered: the mount is whole. */
  ready: boolean;
  target: string;
  dataDir?: string;
  pgPort?: number;
  connection?: string;
  secondsToFirstQuery?: number;
  phases?: Record<string, number>;
  steps: MountStep[];
}

export function mountsDir(stateDir: string): string {
  return path.join(stateDir, 'mounts');
}

export function mountStatePath(stateDir: string, mountId: string): string {
  return path.join(mountsDir(stateDir), `${mountId}.json`);
}

/** Mount ids name files and directories: keep them to a safe alphabet. */
export function checkMountId(id: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(id)) throw new BlocksnapError('E_USAGE', `invalid mount id ${JSON.stringify(id)}`);
}

export async function currentOwner(): Promise<MountOwner> {
  return { pid: process.pid, startTime: await processStartTime(process.pid), bootId: await bootId() };
}

/** True if the process that recorded `owner` still runs (same boot, pid and start time). */
export async function ownerAlive(owner: MountOwner): Promise<boolean> {
  const boot = await bootId();
  if (owner.bootId && boot && owner.bootId !== boot) return false;
  return isAlive(owner.pid, owner.startTime);
}

/**
 * The state of one mount, written through on every change. `step` records a
 * step before it is taken and returns a function that completes the record
 * with what the step produced.
 */
export class MountJournal {
  private constructor(readonly file: string, readonly state: MountState) {}

  static async create(stateDir: string, init: Pick<MountState, 'mountId' | 'imageId' | 'target'>): Promise<MountJournal> {
    checkMountId(init.mountId);
    const file = mountStatePath(stateDir, init.mountId);
    await mkdir(mountsDir(stateDir), { recursive: true, mode: 0o700 });
    const exists = await readFile(file).then(() => true, () => false);
    if (exists) throw new BlocksnapError('E_BUSY', `mount ${init.mountId} already exists (${file})`);
    const state: MountState = {
      format: MOUNT_STATE_FORMAT, version: 1, ...init, stateDir: path.resolve(stateDir), owner: await currentOwner(),
      createdAt: new Date().toISOString(), ready: false, steps: [],
    };
    const j = new MountJournal(file, state);
    await j.save();
    return j;
  }

  static adopt(file: string, state: MountState): MountJournal {
    return new MountJournal(file, state);
  }

  async save(): Promise<void> {
    try {
      await writeFileDurably(this.file, JSON.stringify(this.state, null, 2) + '\n');
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot write mount state ${this.file}`, { cause: e });
    }
  }

  /** Records `step` durably; the returned function merges what the step produced and saves again. */
  async step<K extends MountStep['kind']>(step: Extract<MountStep, { kind: K }>): Promise<(produced: Partial<Extract<MountStep, { kind: K }>>) => Promise<void>> {
    this.state.steps.push(step);
    await this.save();
    return async (produced) => {
      Object.assign(step, produced);
      await this.save();
    };
  }

  async update(patch: Partial<MountState>): Promise<void> {
    Object.assign(this.state, patch);
    await this.save();
  }

  async remove(): Promise<void> {
    await rm(this.file, { force: true });
    await fsyncDir(path.dirname(this.file)).catch(() => undefined);
  }
}

/** Every mount state file in `stateDir`; a malformed one is an E_FORMAT error naming it. */
export async function readMountStates(stateDir: string): Promise<Array<{ file: string; state: MountState }>> {
  let names: string[];
  try {
    names = await readdir(mountsDir(stateDir));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new BlocksnapError('E_STORE_IO', `cannot read ${mountsDir(stateDir)}`, { cause: e });
  }
  const out: Array<{ file: string; state: MountState }> = [];
  for (const name of names.filter((n) => n.endsWith('.json') && !n.startsWith('.')).sort()) {
    const file = path.join(mountsDir(stateDir), name);
    let s: Partial<MountState>;
    try {
      s = JSON.parse(await readFile(file, 'utf8')) as Partial<MountState>;
    } catch (e) {
      throw new BlocksnapError('E_FORMAT', `unreadable mount state ${file}`, { cause: e });
    }
    if (s.format !== MOUNT_STATE_FORMAT || s.version !== 1 || typeof s.mountId !== 'string' || !Array.isArray(s.steps) || typeof s.owner !== 'object') {
      throw new BlocksnapError('E_FORMAT', `${file} is not a version 1 mount state`);
    }
    out.push({ file, state: s as MountState });
  }
  return out;
}
