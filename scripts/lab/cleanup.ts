/**
 * Releases what test helpers recorded in their ledgers (ledger.ts): used by
 * a lab's own `destroy()` and, for ledgers whose owner process is dead, by
 * `cleanupLeftovers` (the cleanup command). Every release first checks that
 * the resource is still the one we recorded — the same postmaster (pid, start
 * time, working directory), a mount of the recorded source at the recorded
 * target, a loop device still backed by the recorded file — because other
 * runs on this machine may own a reused pid or loop number by now.
 */
import { readFile, realpath, rm } from 'node:fs/promises';
import { execa } from 'execa';
import { toBlocksnapError } from '../../proto/errors.js';
import type { Logger } from '../../proto/shared/log.js';
import { isAlive, processComm, processCwd } from '../../proto/shared/proc.js';
import { findMount, readMountTable, thawFilesystem } from '../../agent/snapshot/fsfreeze.js';
import { defaultLedgerDir, isOwnerAlive, listLedgers, readLedger, type LedgerResource } from './ledger.js';
import { detachLoop, findLoopsByBackingFile } from './loop.js';

export type CleanupOutcome = 'released' | 'absent' | 'would-release' | 'skipped' | 'failed';

export interface CleanupAction {
  ledger: string;
  kind: LedgerResource['kind'] | 'ledger';
  target: string;
  outcome: CleanupOutcome;
  detail?: string;
}

export interface CleanupReport {
  actions: CleanupAction[];
  /** Ledgers left alone because their owner still runs. */
  live: Array<{ ledger: string; pid: number }>;
  failures: number;
}

export interface ReleaseOptions {
  dryRun?: boolean;
  logger?: Logger;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function postmasterPid(r: Extract<LedgerResource, { kind: 'postmaster' }>): Promise<number | null> {
  if (r.pid) return r.pid;
  try {
    const first = (await readFile(`${r.dataDir}/postmaster.pid`, 'utf8')).split('\n')[0]!.trim();
    return /^\d+$/.test(first) ? Number(first) : null;
  } catch {
    return null;
  }
}

/** True if `pid` is a postgres process that runs in `dataDir` (a postmaster chdirs into its data directory). */
export async function isPostmasterOf(pid: number, startTime: string | null, dataDir: string): Promise<boolean> {
  if (!(await isAlive(pid, startTime))) return false;
  const comm = await processComm(pid);
  const cwd = await processCwd(pid);
  return (comm === 'postgres' || comm === 'postmaster') && cwd !== null && cwd === (await realpath(dataDir).catch(() => dataDir));
}

/**
 * Stops one postmaster by PID: SIGINT (fast shutdown), then SIGKILL if it is
 * still there after `graceMs`. Never signals a process that is not the
 * recorded postmaster.
 */
export async function stopPostmasterByPid(pid: number, startTime: string | null, dataDir: string, graceMs = 15_000): Promise<'stopped' | 'absent'> {
  if (!(await isPostmasterOf(pid, startTime, dataDir))) return 'absent';
  for (const [signal, wait] of [['SIGINT', graceMs], ['SIGKILL', 5_000]] as const) {
    try {
      process.kill(pid, signal);
    } catch {
      return 'stopped';
    }
    const deadline = Date.now() + wait;
    while (Date.now() < deadline) {
      if (!(await isAlive(pid, startTime))) return 'stopped';
      await sleep(50);
    }
  }
  throw new Error(`postmaster ${pid} survived SIGKILL`);
}

async function unmount(target: string, fstype: string): Promise<void> {
  const fuse = fstype.startsWith('fuse');
  if (!fuse) await thawFilesystem(target, { ignoreNotFrozen: true }).catch(() => undefined);
  const deadline = Date.now() + 10_000;
  for (;;) {
    let r = fuse ? await execa('fusermount3', ['-u', target], { reject: false, stdin: 'ignore' }) : undefined;
    if (!r || r.exitCode !== 0) r = await execa('umount', [target], { reject: false, stdin: 'ignore', timeout: 60_000 });
    if (r.exitCode === 0 || !(await findMount(target))) return;
    // Children of a just-killed postmaster may still hold files open.
    if (!/busy/i.test(String(r.stderr)) || Date.now() > deadline) throw new Error(`umount ${target}: ${String(r.stderr).trim()}`);
    await sleep(200);
  }
}

async function releaseOne(r: LedgerResource, dryRun: boolean): Promise<{ target: string; outcome: CleanupOutcome; detail?: string }> {
  switch (r.kind) {
    case 'postmaster': {
      const pid = await postmasterPid(r);
      const target = `${pid ?? '?'} (${r.dataDir})`;
      if (pid === null || !(await isPostmasterOf(pid, r.startTime, r.dataDir))) return { target, outcome: 'absent' };
      if (dryRun) return { target, outcome: 'would-release' };
      return { target, outcome: (await stopPostmasterByPid(pid, r.startTime, r.dataDir)) === 'stopped' ? 'released' : 'absent' };
    }
    case 'mount': {
      const entry = await findMount(r.target);
      if (!entry) return { target: r.target, outcome: 'absent' };
      if (!r.fstype.startsWith('fuse') && entry.source !== r.source) {
        return { target: r.target, outcome: 'skipped', detail: `mounted from ${entry.source}, not ${r.source}` };
      }
      if (dryRun) return { target: r.target, outcome: 'would-release' };
      // A test may have attached and mounted a file that lives on this mount (an
      // exported image) and died before releasing it: release those first, or
      // the unmount fails with EBUSY.
      await releaseNestedUnder(r.target);
      await unmount(r.target, entry.fstype);
      return { target: r.target, outcome: 'released' };
    }
    case 'loop': {
      const devices = new Set(await findLoopsByBackingFile(r.backingFile));
      const target = `${[...devices].join(',') || r.device || '?'} (${r.backingFile})`;
      if (devices.size === 0) return { target, outcome: 'absent' };
      if (dryRun) return { target, outcome: 'would-release' };
      for (const d of devices) await detachLoop(d, { backingFile: r.backingFile });
      return { target, outcome: 'released' };
    }
    case 'dir': {
      const exists = await realpath(r.path).catch(() => undefined);
      if (!exists) return { target: r.path, outcome: 'absent' };
      // A dry run has not unmounted what lies inside, a real run has by now.
      if (dryRun) return { target: r.path, outcome: 'would-release' };
      const inside = (await readMountTable()).filter((m) => m.mountPoint === exists || m.mountPoint.startsWith(`${exists}/`));
      if (inside.length) {
        return { target: r.path, outcome: 'failed', detail: `still has mounts: ${inside.map((m) => m.mountPoint).join(', ')}` };
      }
      await rm(exists, { recursive: true, force: true });
      return { target: r.path, outcome: 'released' };
    }
  }
}

/** Unmounts mounts strictly below `dir`, and detaches (after unmounting) loop devices backed by files below it. */
async function releaseNestedUnder(dir: string): Promise<void> {
  const prefix = dir.endsWith('/') ? dir : dir + '/';
  const nested = (await readMountTable()).filter((m) => m.mountPoint.startsWith(prefix)).sort((a, b) => b.mountPoint.length - a.mountPoint.length);
  for (const m of nested) await unmount(m.mountPoint, m.fstype);
  const loops = await execa('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE'], { reject: false });
  for (const line of String(loops.stdout).split('\n')) {
    const [dev, back] = line.trim().split(/\s+/, 2);
    if (!dev || !back?.startsWith(prefix)) continue;
    for (const m of await readMountTable()) if (m.source === dev) await unmount(m.mountPoint, m.fstype);
    await detachLoop(dev, { backingFile: back });
  }
}

/**
 * Releases `resources` of one ledger: postmasters first (they hold files on
 * the mounts), then everything else in reverse creation order. A failure is
 * recorded and the rest still attempted.
 */
export async function releaseResources(ledger: string, resources: readonly LedgerResource[], opts: ReleaseOptions = {}): Promise<CleanupAction[]> {
  const ordered = [...resources.filter((r) => r.kind === 'postmaster'), ...resources.filter((r) => r.kind !== 'postmaster').reverse()];
  const actions: CleanupAction[] = [];
  for (const r of ordered) {
    let action: CleanupAction;
    try {
      action = { ledger, kind: r.kind, ...(await releaseOne(r, opts.dryRun ?? false)) };
    } catch (e) {
      action = { ledger, kind: r.kind, target: JSON.stringify(r), outcome: 'failed', detail: toBlocksnapError(e).message };
    }
    if (action.outcome === 'failed') opts.logger?.error(action, 'cannot release test resource');
    else if (action.outcome === 'released') opts.logger?.info(action, 'released test resource');
    actions.push(action);
  }
  return actions;
}

/**
 * Releases every ledger in `ledgerDir` whose owner process is gone, and
 * deletes each ledger once all of it is released. With `dryRun` only reports.
 */
export async function cleanupLeftovers(opts: ReleaseOptions & { ledgerDir?: string } = {}): Promise<CleanupReport> {
  const report: CleanupReport = { actions: [], live: [], failures: 0 };
  const dead: Array<{ file: string; createdAt: string; resources: LedgerResource[] }> = [];
  for (const file of await listLedgers(opts.ledgerDir ?? defaultLedgerDir())) {
    let ledger;
    try {
      ledger = await readLedger(file);
    } catch (e) {
      // A half-written temp or a foreign file: leave it, but say so.
      report.actions.push({ ledger: file, kind: 'ledger', target: file, outcome: 'skipped', detail: toBlocksnapError(e).message });
      continue;
    }
    if (await isOwnerAlive(ledger.owner)) report.live.push({ ledger: file, pid: ledger.owner.pid });
    else dead.push({ file, createdAt: ledger.createdAt, resources: ledger.resources });
  }
  // Newest first: a lab created inside another one's mount goes before it.
  dead.sort((a, b) => b.createdAt.localeCompare(a.createdAt));
  const incomplete = new Set<string>();
  const record = (actions: CleanupAction[]) => {
    for (const a of actions) if (a.outcome === 'failed' || a.outcome === 'skipped') incomplete.add(a.ledger);
    report.actions.push(...actions);
  };
  // Postmasters of every dead ledger go first: a cluster's ledger is separate
  // from the ledger of the volume it runs on.
  for (const d of dead) record(await releaseResources(d.file, d.resources.filter((r) => r.kind === 'postmaster'), opts));
  for (const d of dead) {
    record(await releaseResources(d.file, d.resources.filter((r) => r.kind !== 'postmaster'), opts));
    if (opts.dryRun) {
      report.actions.push({ ledger: d.file, kind: 'ledger', target: d.file, outcome: 'would-release' });
    } else if (!incomplete.has(d.file)) {
      await rm(d.file, { force: true });
      report.actions.push({ ledger: d.file, kind: 'ledger', target: d.file, outcome: 'released' });
    }
  }
  report.failures = report.actions.filter((a) => a.outcome === 'failed').length;
  return report;
}
