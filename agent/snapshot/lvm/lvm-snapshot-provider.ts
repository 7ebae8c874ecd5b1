/**
 * LVM snapshots (DESIGN.md §7, issue 10): "lvm-classic" (`lvcreate
 * --snapshot -L SIZE`, a copy-on-write area sized by a policy) and
 * "lvm-thin" (`lvcreate -s` of a thin LV, activated with `-K`).
 *
 * - Every snapshot LV carries the tags `blocksnap`, `bsn.agent.<agent>`,
 *   `bsn.vol.<volume>` and `bsn.job.<tag>`: list/cleanupStale find this
 *   agent's snapshots by tag from LVM alone (a restarted agent removes its
 *   orphans, and never another agent's or a human's snapshot).
 * - The filesystem is frozen by lvcreate itself: LVM suspends the origin
 *   with lockfs (freeze_bdev) for the instant of the snapshot, and nothing
 *   of ours stays frozen if the agent is killed. Measured in the lab
 *   (kernel 6.1): an fsfreeze of our own before lvcreate makes that suspend
 *   fail with EBUSY (freeze_super of an already frozen superblock).
 *   A filesystem on a device stacked over the LV (dm-era) is not on the
 *   suspended device: we freeze it around lvcreate ourselves, under a
 *   freeze marker (freeze-marker.ts) that cleanupStale consumes after a
 *   kill, as the reflink provider does.
 * - Consistency groups (createGroup), lvm-classic only: `dmsetup suspend`
 *   (lockfs: flush + freeze) of every member's origin, then one lvcreate per
 *   member — LVM finds its origin already suspended, skips its own suspend,
 *   loads the snapshot tables and resumes that origin — then a resume of any
 *   origin still suspended. No member takes a write between the first
 *   suspend and its own snapshot, so the snapshots are one crash-consistent
 *   cut (measured: a writer alternating between two filesystems is seen in
 *   order). A durable marker in the state dir lists the suspended devices
 *   first: cleanupStale resumes them after a kill. lvm-thin cannot: with the
 *   origin already suspended LVM skips the suspend that carries the pool's
 *   create_snap message, the snapshot exists only in LVM's metadata and the
 *   pool's transaction id is out of step (every later lvcreate in the pool
 *   fails) — measured, so lvm-thin offers no createGroup (agents refuse the
 *   group, E_CONFIG).
 * - A failure anywhere (lvcreate failing midway, no free extents) removes
 *   the job's snapshot LV by its tags: nothing is left.
 * - Classic: a watcher polls the snapshot's `data_percent` while the job
 *   reads it; at `fillLimitPercent` (or if the kernel already invalidated
 *   it) it replaces the snapshot's table with the error target, so the job
 *   fails on its next read instead of reading an invalidated snapshot, and
 *   logs why. lvm-thin watches the pool's fill the same way.
 */
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError, toBlocksnapError } from '../../../proto/errors.js';
import { makePrivateDir, writeFileDurably } from '../../../proto/shared/durable-file.js';
import { createLogger, type Logger } from '../../../proto/shared/log.js';
import { readBlockDeviceInfo } from '../../cbt/device-identity.js';
import { frozenDuring, thawStaleFreezes } from '../freeze-marker.js';
import { findMount } from '../fsfreeze.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from '../snapshot-provider.js';
import type { VolumeIdentity } from '../volume-identity.js';
import { isInvalidSnapshot, listLvs, lvInfo, lvm, vgInfo, type LvInfo } from './lvm-cli.js';
import { lvNameOf, proveLvmVolume } from './lvm-volume-identity.js';

export type LvmSnapshotMode = 'classic' | 'thin';

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const TAG = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
export const BLOCKSNAP_TAG = 'blocksnap';

export interface LvmSnapshotProviderOptions {
  mode: LvmSnapshotMode;
  /** The agent's name: snapshots are tagged bsn.agent.<agent>. */
  agent: string;
  stateDir: string;
  logger?: Logger;
  /** Classic CoW area: `percent` of the origin, at least `minBytes` (default 20 %, 32 MiB). */
  cow?: { percent: number; minBytes: number };
  /** Fail the job when the CoW area (classic) or the thin pool (thin) is this full (default 90). */
  fillLimitPercent?: number;
  /** Fill poll interval while a snapshot exists (default 2 s). */
  pollMs?: number;
  /**
   * lvm-classic consistency groups (createGroup): on unless `false`. They
   * were off for a while (a contract run had read, out of a member's group
   * snapshot, a file one byte short of what was written: the test's
   * read-back dropped a trailing newline, see debugfsCat in
   * test/agent/snapshot-provider.contract.ts; the snapshots were right).
   */
  groups?: boolean;
}

export const agentTag = (agent: string) => `bsn.agent.${agent}`;
const volTag = (v: string) => `bsn.vol.${v}`;
const jobTag = (t: string) => `bsn.job.${t}`;

/**
 * The snapshot LV's name: bsn.<volume>.<tag>, characters LVM refuses in
 * names as '+'. No '_' is added: LVM reserves names containing _cdata,
 * _tmeta, _rimage … for its sub-LVs.
 */
export function snapshotLvName(volume: string, tag: string): string {
  return `bsn.${volume}.${tag}`.replace(/[^A-Za-z0-9+_.-]/g, '+').slice(0, 120);
}

interface Item {
  volume: VolumeSpec;
  origin: LvInfo;
  name: string;
  cowBytes: number;
}

/** The origins a group snapshot holds suspended (cleanupStale resumes them after a kill). */
const SUSPEND_MARKER = 'lvm-group-suspended.json';

/** dm name of an LV (dashes doubled). */
const dmNameOf = (vg: string, lv: string) => `${vg.replace(/-/g, '--')}-${lv.replace(/-/g, '--')}`;

/** LVM must not open a suspended device while it scans (it would block on it). */
const SKIP_SUSPENDED = ['--config', 'devices { ignore_suspended_devices = 1 }'];

async function isSuspended(dm: string): Promise<boolean> {
  const attr = await lvm('dmsetup', ['info', '-c', '--noheadings', '-o', 'attr', dm]).catch(() => '');
  return attr.trim()[2] === 's';
}

export class LvmSnapshotProvider implements SnapshotProvider {
  readonly kind: string;
  /** lvm-classic only: see the file comment. */
  readonly createGroup?: (volumes: VolumeSpec[], tag: string) => Promise<Snapshot[]>;
  private readonly log: Logger;
  private readonly inFlight = new Set<string>();
  private readonly watchers = new Map<string, NodeJS.Timeout>();
  private readonly cow: { percent: number; minBytes: number };
  private readonly fillLimit: number;

  constructor(private readonly opts: LvmSnapshotProviderOptions) {
    this.kind = `lvm-${opts.mode}`;
    this.log = opts.logger ?? createLogger(this.kind);
    this.cow = opts.cow ?? { percent: 20, minBytes: 32 << 20 };
    this.fillLimit = opts.fillLimitPercent ?? 90;
    if (opts.mode === 'classic' && opts.groups !== false) this.createGroup = (volumes, tag) => this.createClassicGroup(volumes, tag);
  }

  /** createGroup of lvm-classic: suspend every origin, snapshot each, resume (see the file comment). */
  private async createClassicGroup(volumes: VolumeSpec[], tag: string): Promise<Snapshot[]> {
    if (!TAG.test(tag)) throw new BlocksnapError('E_CONFIG', `invalid snapshot tag ${JSON.stringify(tag)}`);
    for (const v of volumes) if (!VOLUME_NAME.test(v.name)) throw new BlocksnapError('E_CONFIG', `invalid volume name ${JSON.stringify(v.name)}`);
    if (new Set(volumes.map((v) => v.name)).size !== volumes.length) throw new BlocksnapError('E_CONFIG', 'a consistency group names a volume twice');
    const busy = volumes.find((v) => this.inFlight.has(v.name));
    if (busy) throw new BlocksnapError('E_BUSY', `a snapshot of ${busy.name} is already being taken`);
    for (const v of volumes) this.inFlight.add(v.name);
    try {
      return await this.createGroupLocked(volumes, tag);
    } finally {
      for (const v of volumes) this.inFlight.delete(v.name);
    }
  }

  private async createGroupLocked(volumes: VolumeSpec[], tag: string): Promise<Snapshot[]> {
    const started = performance.now();
    const items: Item[] = [];
    for (const v of volumes) items.push(await this.plan(v, tag));
    const origins = new Set(items.map((it) => `${it.origin.vg}/${it.origin.name}`));
    if (origins.size !== items.length) throw new BlocksnapError('E_CONFIG', 'two volumes of the group are one logical volume');
    // The origin's suspend does not freeze a filesystem on a device stacked over the LV (dm-era): not offered yet.
    for (const it of items) {
      if (await isStackedOver(it.volume.device, it.origin)) {
        throw new BlocksnapError('E_CONFIG', `volume ${it.volume.name} is on a device stacked over its LV (${it.volume.device}): lvm-classic consistency groups take volumes on the LV itself`);
      }
    }
    // Each member's CoW area was checked alone; together they must fit too.
    const needs = new Map<string, number>();
    for (const it of items) needs.set(it.origin.vg, (needs.get(it.origin.vg) ?? 0) + it.cowBytes);
    for (const [vg, need] of needs) {
      const info = await vgInfo(vg);
      if (need > info.free) throw new BlocksnapError('E_SNAPSHOT', `no free extents in volume group ${vg} for the copy-on-write areas of the group: need ${need} bytes, ${info.free} free`);
    }
    const dms = items.map((it) => dmNameOf(it.origin.vg, it.origin.name));
    const ids = items.map((it) => `${it.volume.name}@${tag}`);
    await makePrivateDir(this.opts.stateDir);
    const marker = path.join(this.opts.stateDir, SUSPEND_MARKER);
    // Durable before the first suspend: a kill anywhere in the window is found by cleanupStale.
    await writeFileDurably(marker, JSON.stringify({ devices: dms, tag, at: new Date().toISOString() }));
    let suspendedAt = 0;
    let resumedAt = 0;
    let failure: unknown = null;
    try {
      for (const dm of dms) {
        await lvm('dmsetup', ['suspend', dm]); // lockfs: the filesystem is flushed and frozen
        suspendedAt ||= performance.now();
      }
      for (const it of items) {
        const tags = [BLOCKSNAP_TAG, agentTag(this.opts.agent), volTag(it.volume.name), jobTag(tag)].flatMap((t) => ['--addtag', t]);
        // LVM finds the origin suspended, skips its own suspend and resumes it after the snapshot.
        await lvm('lvcreate', [...SKIP_SUSPENDED, '-q', '-s', '-L', `${it.cowBytes}b`, '-p', 'r', '-n', it.name, ...tags, `${it.origin.vg}/${it.origin.name}`]);
      }
    } catch (e) {
      failure = e;
    } finally {
      const stuck: string[] = [];
      for (const dm of dms) {
        if (!(await isSuspended(dm))) continue;
        await lvm('dmsetup', ['resume', dm]).catch((e: unknown) => {
          stuck.push(dm);
          this.log.error({ err: e, device: dm }, 'cannot resume a suspended origin');
        });
      }
      resumedAt = performance.now();
      if (stuck.length) failure ??= new BlocksnapError('E_SNAPSHOT', `cannot resume ${stuck.join(', ')} after group snapshot ${ids.join(', ')}; cleanupStale retries`);
      else await rm(marker, { force: true });
    }
    if (failure === null) {
      for (const it of items) {
        const lv = await lvInfo(`${it.origin.vg}/${it.name}`).catch((e: unknown) => (failure ??= e, null));
        if (lv && isInvalidSnapshot(lv)) failure ??= new BlocksnapError('E_SNAPSHOT', `snapshot ${lv.vg}/${lv.name} is invalid right after creation`);
      }
    }
    if (failure !== null) {
      for (const it of items) await this.removeJob(it, tag).catch((err: unknown) => this.log.error({ err }, 'cannot remove the snapshot of a failed group'));
      this.log.warn({ kind: this.kind, snapshots: ids, err: failure }, 'group snapshot failed; nothing left');
      throw toBlocksnapError(failure, 'E_SNAPSHOT');
    }
    const freezeSeconds = (resumedAt - suspendedAt) / 1000;
    const snapshotSeconds = (performance.now() - started) / 1000;
    const createdAt = new Date();
    const out = items.map((it, i): Snapshot => ({ id: ids[i]!, volume: it.volume.name, path: `/dev/${it.origin.vg}/${it.name}`, createdAt, freezeSeconds, snapshotSeconds }));
    out.forEach((snap, i) => this.watch(items[i]!, snap));
    this.log.info({ kind: this.kind, snapshots: out.map((x) => x.path), freezeSeconds, snapshotSeconds }, 'group snapshot created');
    return out;
  }

  /** Resumes origins a killed group snapshot left suspended (the marker names them). */
  private async resumeStale(): Promise<string[]> {
    const marker = path.join(this.opts.stateDir, SUSPEND_MARKER);
    const text = await readFile(marker, 'utf8').catch(() => null);
    if (text === null) return [];
    let devices: string[] = [];
    try {
      devices = (JSON.parse(text) as { devices?: string[] }).devices ?? [];
    } catch {
      // a torn marker cannot happen (durable write); an unreadable one names nothing
    }
    const released: string[] = [];
    for (const dm of devices) {
      if (!(await isSuspended(dm))) continue;
      await lvm('dmsetup', ['resume', dm]);
      released.push(`resumed:${dm}`);
    }
    await rm(marker, { force: true });
    if (released.length) this.log.warn({ released }, 'resumed origins a killed group snapshot left suspended');
    return released;
  }

  proveIdentity(volume: VolumeSpec): Promise<VolumeIdentity> {
    return proveLvmVolume(volume);
  }

  async volumeSize(volume: VolumeSpec): Promise<number> {
    return (await lvInfo(lvNameOf(volume))).size;
  }

  async create(volume: VolumeSpec, tag: string): Promise<Snapshot> {
    if (!TAG.test(tag)) throw new BlocksnapError('E_CONFIG', `invalid snapshot tag ${JSON.stringify(tag)}`);
    if (!VOLUME_NAME.test(volume.name)) throw new BlocksnapError('E_CONFIG', `invalid volume name ${JSON.stringify(volume.name)}`);
    if (this.inFlight.has(volume.name)) throw new BlocksnapError('E_BUSY', `a snapshot of ${volume.name} is already being taken`);
    this.inFlight.add(volume.name);
    try {
      return await this.createLocked(volume, tag);
    } finally {
      this.inFlight.delete(volume.name);
    }
  }

  private async plan(volume: VolumeSpec, tag: string): Promise<Item> {
    const origin = await lvInfo(lvNameOf(volume));
    if (this.opts.mode === 'thin' && origin.segtype !== 'thin') {
      throw new BlocksnapError('E_CONFIG', `LV ${origin.vg}/${origin.name} of volume ${volume.name} is not a thin LV (segtype ${origin.segtype}): lvm-thin snapshots thin LVs`);
    }
    if (await findMount(volume.mountpoint) === undefined) throw new BlocksnapError('E_CONFIG', `${volume.mountpoint} of volume ${volume.name} is not a mount point`);
    const existing = await listLvs([`@${jobTag(tag)}`]);
    if (existing.some((l) => l.tags.includes(volTag(volume.name)))) {
      throw new BlocksnapError('E_SNAPSHOT', `snapshot ${volume.name}@${tag} already exists`);
    }
    let cowBytes = 0;
    if (this.opts.mode === 'classic') {
      const vg = await vgInfo(origin.vg);
      const want = Math.max(this.cow.minBytes, Math.ceil((origin.size * this.cow.percent) / 100));
      cowBytes = Math.ceil(want / vg.extentSize) * vg.extentSize;
      if (cowBytes > vg.free) {
        throw new BlocksnapError('E_SNAPSHOT', `no free extents in volume group ${origin.vg} for the copy-on-write area of ${volume.name}: need ${cowBytes} bytes, ${vg.free} free`);
      }
    }
    return { volume, origin, name: snapshotLvName(volume.name, tag), cowBytes };
  }

  private async createLocked(volume: VolumeSpec, tag: string): Promise<Snapshot> {
    const started = performance.now();
    const it = await this.plan(volume, tag);
    const id = `${volume.name}@${tag}`;
    const vgLv = `${it.origin.vg}/${it.name}`;
    let freezeSeconds = 0;
    try {
      const tags = [BLOCKSNAP_TAG, agentTag(this.opts.agent), volTag(volume.name), jobTag(tag)].flatMap((t) => ['--addtag', t]);
      const size = this.opts.mode === 'classic' ? ['-L', `${it.cowBytes}b`, '-p', 'r'] : [];
      // lvcreate freezes the origin's filesystem itself (dm suspend with lockfs) for the instant of the
      // snapshot; an fsfreeze of our own before it makes that suspend fail with EBUSY (see the file comment).
      // A filesystem on a device stacked over the LV (dm-era's era target) is not frozen by the LV's
      // suspend: freeze it ourselves around lvcreate (no conflict: its superblock is not on the LV).
      // The freeze is under a durable marker: an agent killed inside it (lvcreate can wait long for the VG's
      // lock) leaves a record the next start's cleanupStale thaws; a freeze that failed late is thawed too.
      const stacked = await isStackedOver(volume.device, it.origin);
      const t0 = performance.now();
      const snap = () => lvm('lvcreate', ['-q', '-s', ...size, '-n', it.name, ...tags, `${it.origin.vg}/${it.origin.name}`]);
      if (stacked) await frozenDuring(this.opts.stateDir, volume, snap);
      else await snap();
      freezeSeconds = (performance.now() - t0) / 1000;
      if (this.opts.mode === 'thin') await lvm('lvchange', ['-q', '-ay', '-K', vgLv]);
      const lv = await lvInfo(vgLv);
      if (isInvalidSnapshot(lv)) throw new BlocksnapError('E_SNAPSHOT', `snapshot ${vgLv} is invalid right after creation`);
    } catch (e) {
      await this.removeJob(it, tag).catch((err: unknown) => this.log.error({ err }, 'cannot remove the snapshot of a failed job'));
      this.log.warn({ kind: this.kind, snapshot: id, err: e }, 'snapshot failed; nothing left');
      throw toBlocksnapError(e, 'E_SNAPSHOT');
    }
    const snapshotSeconds = (performance.now() - started) / 1000;
    const s: Snapshot = { id, volume: volume.name, path: `/dev/${vgLv}`, createdAt: new Date(), freezeSeconds, snapshotSeconds };
    this.watch(it, s);
    this.log.info({ kind: this.kind, snapshot: s.path, freezeSeconds, snapshotSeconds }, 'snapshot created');
    return s;
  }

  /** Removes every snapshot LV this agent made for `tag` on this volume (lvcreate failing midway). */
  private async removeJob(it: Item, tag: string): Promise<void> {
    const mine = await listLvs([`@${jobTag(tag)}`]).catch(() => [] as LvInfo[]);
    for (const lv of mine) {
      if (!lv.tags.includes(agentTag(this.opts.agent))) continue;
      if (!lv.tags.includes(volTag(it.volume.name))) continue;
      await lvm('lvremove', ['-q', '-f', `${lv.vg}/${lv.name}`]);
    }
  }

  /**
   * Polls the fill that could overflow while the snapshot is read (see the
   * file comment); stops by itself once the snapshot is gone.
   */
  private watch(it: Item, s: Snapshot): void {
    const vgLv = `${it.origin.vg}/${it.name}`;
    const pool = this.opts.mode === 'thin' && it.origin.pool ? `${it.origin.vg}/${it.origin.pool}` : null;
    let busy = false;
    const stop = () => {
      clearInterval(timer);
      this.watchers.delete(s.id);
    };
    const timer = setInterval(() => {
      if (busy) return;
      busy = true;
      void (async () => {
        const lvs = await listLvs(pool ? [vgLv, pool] : [vgLv]).catch(() => null);
        const snap = lvs?.find((l) => l.name === it.name);
        if (!lvs || !snap) return stop();
        const target = pool ? lvs.find((l) => `${l.vg}/${l.name}` === pool) : snap;
        if (!target) return;
        if (target.dataPercent < this.fillLimit && !isInvalidSnapshot(snap)) return;
        stop();
        const why = isInvalidSnapshot(snap)
          ? `snapshot ${vgLv} was invalidated by the kernel (its CoW area overflowed)`
          : `${pool ? `thin pool ${pool}` : `CoW area of snapshot ${vgLv}`} is ${target.dataPercent}% full (limit ${this.fillLimit}%)`;
        // The error target makes every further read fail with EIO: the job stops instead of reading
        // a snapshot that is (or is about to be) invalid. Logged after, so the log means it is done.
        await lvm('dmsetup', ['wipe_table', `${it.origin.vg.replace(/-/g, '--')}-${it.name.replace(/-/g, '--')}`]).then(
          () => this.log.error({ snapshot: s.id, reason: why }, 'snapshot unusable: its device now fails every read, the job fails and commits no image'),
          (err: unknown) => this.log.error({ err, snapshot: s.id, reason: why }, 'snapshot unusable, and its device could not be failed'));
      })().finally(() => (busy = false));
    }, this.opts.pollMs ?? 2000);
    timer.unref();
    this.watchers.set(s.id, timer);
  }

  async remove(snapshot: Snapshot): Promise<void> {
    const timer = this.watchers.get(snapshot.id);
    if (timer) clearInterval(timer);
    this.watchers.delete(snapshot.id);
    const m = /^\/dev\/([^/]+)\/([^/]+)$/.exec(snapshot.path);
    if (!m) throw new BlocksnapError('E_SNAPSHOT', `${snapshot.path} is not an LVM snapshot of ${snapshot.id}`);
    const found = await listLvs([`${m[1]}`]).then((l) => l.find((x) => x.name === m[2]), () => undefined);
    if (!found) return;
    if (!found.tags.includes(agentTag(this.opts.agent))) {
      throw new BlocksnapError('E_SNAPSHOT', `${m[1]}/${m[2]} is not a snapshot of agent ${this.opts.agent}: not removed`);
    }
    try {
      await lvm('lvremove', ['-q', '-f', `${m[1]}/${m[2]}`]);
    } catch {
      // A thin snapshot whose table the watcher replaced with the error target: LVM's first
      // lvremove fails ("… is used by another device") but deactivates it; the second removes
      // the now inactive LV (measured in the lab). A real failure fails again here.
      await lvm('lvremove', ['-q', '-f', `${m[1]}/${m[2]}`]);
    }
  }

  async list(): Promise<Snapshot[]> {
    const lvs = await listLvs([`@${agentTag(this.opts.agent)}`]);
    const out: Snapshot[] = [];
    for (const lv of lvs) {
      const vol = lv.tags.find((t) => t.startsWith('bsn.vol.'))?.slice('bsn.vol.'.length);
      const tag = lv.tags.find((t) => t.startsWith('bsn.job.'))?.slice('bsn.job.'.length);
      if (!vol || !tag) continue; // e.g. a tracker's basis snapshot
      out.push({ id: `${vol}@${tag}`, volume: vol, path: `/dev/${lv.vg}/${lv.name}`, createdAt: new Date(lv.time), freezeSeconds: 0, snapshotSeconds: 0 });
    }
    return out;
  }

  async cleanupStale(keep: Set<string> = new Set()): Promise<string[]> {
    const released: string[] = [];
    const errors: unknown[] = [];
    // First: nothing may stay suspended or frozen (every write to those filesystems hangs until then).
    if (this.inFlight.size === 0) await this.resumeStale().then((r) => released.push(...r), (e: unknown) => errors.push(e));
    await thawStaleFreezes(this.opts.stateDir, this.inFlight, async (marker, outcome) => {
      this.log.warn({ volume: marker.volume, mountpoint: marker.mountpoint, outcome }, 'a killed snapshot left a freeze marker: released (outcome says whether a freeze was undone)');
    }).then((r) => { released.push(...r.released); errors.push(...r.errors); }, (e: unknown) => errors.push(e));
    for (const s of await this.list()) {
      if (keep.has(s.id) || this.inFlight.has(s.volume)) continue;
      await this.remove(s).then(() => released.push(`snapshot:${s.id}`), (e: unknown) => errors.push(e));
    }
    if (released.length) this.log.info({ released }, 'released stale LVM snapshot state');
    if (errors.length) throw new BlocksnapError('E_SNAPSHOT', `cleanup of stale LVM snapshots failed ${errors.length} time(s)`, { cause: new AggregateError(errors) });
    return released;
  }
}

/** Whether the volume's device is not the LV itself but a device over it (proven an era target by proveIdentity). */
async function isStackedOver(device: string, origin: LvInfo): Promise<boolean> {
  const { identity } = await readBlockDeviceInfo(device);
  return identity.major !== origin.major || identity.minor !== origin.minor;
}
