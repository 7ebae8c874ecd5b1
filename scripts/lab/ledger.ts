/**
 * Ledger of real resources a test helper created (loop devices, mounts,
 * postmasters, temp dirs), so `cleanupLeftovers` can release what a killed run
 * left. One file per owner object (a volume lab, a PostgreSQL cluster):
 *
 *   <dir>/ledger-<pid>-<random>.json   (dir default /run/blocksnap-test,
 *                                       env BLOCKSNAP_LEDGER_DIR overrides)
 *   { "format": "blocksnap-test-ledger", "version": 1,
 *     "label": "volume-lab",
 *     "createdAt": "ISO-8601",
 *     "owner": { "pid": 123, "startTime": "4567", "bootId": "uuid" },
 *     "resources": [                                  // in creation order
 *       { "kind": "dir",  "path": "/tmp/blocksnap-lab-x" },
 *       { "kind": "loop", "backingFile": "/tmp/…/pool.img", "device": "/dev/loop3" | null },
 *       { "kind": "mount", "target": "/tmp/…/pool", "source": "/dev/loop3", "fstype": "xfs" },
 *       { "kind": "postmaster", "dataDir": "/…", "pid": 99 | null, "startTime": "…" | null } ] }
 *
 * A resource is recorded *before* it is created wherever its identity is
 * known in advance (a loop's backing file, a mount target), so a kill between
 * creating and recording still leaves a trace. The owner is alive only if a
 * process with the same pid, start time (clock ticks since boot) and boot id
 * exists: a reused pid or a reboot makes the ledger orphaned.
 * Every rewrite is temp + fsync + rename + directory fsync.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';
import { bootId, isAlive, processStartTime } from '../../proto/shared/proc.js';

export const LEDGER_FORMAT = 'blocksnap-test-ledger';
export const LEDGER_VERSION = 1;

export type LedgerResource =
  | { kind: 'dir'; path: string }
  | { kind: 'loop'; backingFile: string; device: string | null }
  | { kind: 'mount'; target: string; source: string; fstype: string }
  | { kind: 'postmaster'; dataDir: string; pid: number | null; startTime: string | null };

export interface LedgerOwner {
  pid: number;
  startTime: string | null;
  bootId: string | null;
}

export interface LedgerFile {
  format: typeof LEDGER_FORMAT;
  version: number;
  label: string;
  createdAt: string;
  owner: LedgerOwner;
  resources: LedgerResource[];
}

export function defaultLedgerDir(): string {
  return process.env.BLOCKSNAP_LEDGER_DIR ?? '/run/blocksnap-test';
}

export async function isOwnerAlive(owner: LedgerOwner): Promise<boolean> {
  const boot = await bootId();
  if (owner.bootId && boot && owner.bootId !== boot) return false;
  return isAlive(owner.pid, owner.startTime);
}


export async function readLedger(file: string): Promise<LedgerFile> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `cannot read ledger ${file}`, { cause: e });
  }
  const l = parsed as Partial<LedgerFile>;
  if (l.format !== LEDGER_FORMAT || l.version !== LEDGER_VERSION || !l.owner || !Array.isArray(l.resources)) {
    throw new BlocksnapError('E_FORMAT', `${file} is not a blocksnap test ledger (version ${LEDGER_VERSION})`);
  }
  return l as LedgerFile;
}

/** Ledger files in `dir` (none if the directory does not exist). */
export async function listLedgers(dir = defaultLedgerDir()): Promise<string[]> {
  try {
    const names = await readdir(dir);
    return names.filter((n) => /^ledger-.*\.json$/.test(n)).map((n) => path.join(dir, n)).sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
}

/** The ledger of one owner object in this process; writes are serialised. */
export class Ledger {
  private chain: Promise<unknown> = Promise.resolve();
  private constructor(
    readonly path: string,
    private readonly data: LedgerFile,
  ) {}

  static async create(label: string, dir = defaultLedgerDir()): Promise<Ledger> {
    await mkdir(dir, { recursive: true, mode: 0o755 });
    const file = path.join(dir, `ledger-${process.pid}-${randomBytes(4).toString('hex')}.json`);
    const data: LedgerFile = {
      format: LEDGER_FORMAT,
      version: LEDGER_VERSION,
      label,
      createdAt: new Date().toISOString(),
      owner: { pid: process.pid, startTime: await processStartTime(process.pid), bootId: await bootId() },
      resources: [],
    };
    const ledger = new Ledger(file, data);
    await ledger.save();
    return ledger;
  }

  get resources(): readonly LedgerResource[] {
    return this.data.resources;
  }

  /** Records a resource; returns its index for a later `update`. */
  async add(resource: LedgerResource): Promise<number> {
    const index = this.data.resources.push(resource) - 1;
    await this.save();
    return index;
  }

  async update(index: number, patch: Partial<LedgerResource>): Promise<void> {
    Object.assign(this.data.resources[index]!, patch);
    await this.save();
  }

  /** Deletes the ledger file: call only once everything in it is released. */
  async delete(): Promise<void> {
    await this.serial(async () => {
      await rm(this.path, { force: true });
      await fsyncDir(path.dirname(this.path)).catch(() => undefined);
    });
  }

  private save(): Promise<void> {
    const snapshot = JSON.stringify(this.data, null, 2) + '\n';
    return this.serial(() => writeFileDurably(this.path, snapshot, 0o644));
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.chain.then(fn, fn);
    this.chain = next.catch(() => undefined);
    return next;
  }
}

export { fsyncDir };
