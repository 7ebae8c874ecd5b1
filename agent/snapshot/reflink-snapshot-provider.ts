/**
 * Snapshots of file-backed volumes by reflink: freeze the volume's
 * filesystem, FICLONE its image file inside the (reflink-capable) pool,
 * thaw. The clone lands as `<dir of image>/.blocksnap/.<id>.snap.tmp` and is
 * renamed to `<volume>@<tag>.snap` only once complete and thawed, so a `.snap`
 * file is always a whole snapshot; a kill leaves at worst a `.tmp` and a
 * freeze marker (see freeze-marker.ts) that `cleanupStale` consumes.
 */
import { constants } from 'node:fs';
import { copyFile, mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError, isBlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { createLogger, type Logger } from '../../proto/shared/log.js';
import { assertMountpoint, freezeFilesystem } from './fsfreeze.js';
import { fsyncDir } from '../../proto/shared/durable-file.js';
import { readVolumeRegistry, writeVolumeRegistry } from './reflink-state.js';
import {
  freezeMarkerPath,
  readFreezeMarkers,
  removeStateFile,
  thawStaleFreezes,
  thawWithRetry,
  writeFreezeMarker,
  type FreezeMarker,
} from './freeze-marker.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot-provider.js';
import { proveLoopVolume } from './loop-volume-identity.js';
import type { VolumeIdentity } from './volume-identity.js';

const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const TAG = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const SNAP_DIR = '.blocksnap';

export interface ReflinkSnapshotProviderOptions {
  stateDir: string;
  logger?: Logger;
  /** Volumes whose snapshot directories `list`/`cleanupStale` scan (besides those in the state registry). */
  volumes?: VolumeSpec[];
  freezeTimeoutMs?: number;
}

export interface CreateSnapshotOptions {
  /** Runs while the filesystem is frozen, before the clone (e.g. a change-tracker cut). */
  whileFrozen?: (volume: VolumeSpec) => Promise<void>;
}

export interface StaleReport {
  frozen: Array<{ file: string; marker: FreezeMarker }>;
  snapshots: Snapshot[];
  temps: string[];
}

export function snapshotDirOf(image: string): string {
  return path.join(path.dirname(path.resolve(image)), SNAP_DIR);
}

export class ReflinkSnapshotProvider implements SnapshotProvider {
  readonly kind = 'reflink';
  private readonly stateDir: string;
  private readonly log: Logger;
  private readonly configured = new Map<string, string>();
  private readonly inFlight = new Set<string>();
  private readonly freezeTimeoutMs: number | undefined;

  constructor(opts: ReflinkSnapshotProviderOptions) {
    this.stateDir = path.resolve(opts.stateDir);
    this.log = opts.logger ?? createLogger('reflink-snapshot');
    this.freezeTimeoutMs = opts.freezeTimeoutMs;
    for (const v of opts.volumes ?? []) {
      if (v.image && VOLUME_NAME.test(v.name)) this.configured.set(v.name, snapshotDirOf(v.image));
    }
  }

  /** Image file ↔ loop device ↔ mounted filesystem (loop-volume-identity.ts). */
  proveIdentity(volume: VolumeSpec): Promise<VolumeIdentity> {
    return proveLoopVolume(volume);
  }

  async create(volume: VolumeSpec, tag: string, opts: CreateSnapshotOptions = {}): Promise<Snapshot> {
    return (await this.createGroup([volume], tag, opts))[0]!;
  }

  /**
   * Snapshots several volumes at one instant (a consistency group, DESIGN.md
   * §4.4): a freeze marker per volume, freeze every filesystem, clone every
   * image, thaw them all, then publish the clones. No write reaches any
   * member between the first freeze and the last clone, so the clones are
   * one crash-consistent state of the whole group. Same guarantees as
   * `create`: on failure every filesystem frozen here is thawed and no clone
   * is left; a kill leaves markers that `cleanupStale` consumes.
   */
  async createGroup(volumes: VolumeSpec[], tag: string, opts: CreateSnapshotOptions = {}): Promise<Snapshot[]> {
    if (volumes.length === 0) throw new BlocksnapError('E_CONFIG', 'a snapshot group needs at least one volume');
    if (!TAG.test(tag)) throw new BlocksnapError('E_CONFIG', `invalid snapshot tag ${JSON.stringify(tag)}`);
    const names = new Set<string>();
    const mounts = new Set<string>();
    for (const volume of volumes) {
      if (!VOLUME_NAME.test(volume.name)) throw new BlocksnapError('E_CONFIG', `invalid volume name ${JSON.stringify(volume.name)}`);
      if (!volume.image) throw new BlocksnapError('E_CONFIG', `volume ${volume.name} has no image file: the reflink provider needs one`);
      // One filesystem frozen twice would wait on itself (fsfreeze -f answers EBUSY).
      if (names.has(volume.name) || mounts.has(path.resolve(volume.mountpoint))) {
        throw new BlocksnapError('E_CONFIG', `volume ${volume.name} appears twice in the group (by name or mountpoint)`);
      }
      names.add(volume.name);
      mounts.add(path.resolve(volume.mountpoint));
      if (this.inFlight.has(volume.name)) throw new BlocksnapError('E_BUSY', `a snapshot of ${volume.name} is already being taken`);
    }
    for (const v of volumes) this.inFlight.add(v.name);
    try {
      return await this.createLocked(volumes, tag, opts);
    } finally {
      for (const v of volumes) this.inFlight.delete(v.name);
    }
  }

  private async createLocked(volumes: VolumeSpec[], tag: string, opts: CreateSnapshotOptions): Promise<Snapshot[]> {
    const started = performance.now();
    const items: Array<{ volume: VolumeSpec; image: string; id: string; dir: string; dest: string; tmp: string; marker?: string }> = [];
    for (const volume of volumes) {
      const image = path.resolve(volume.image!);
      const id = `${volume.name}@${tag}`;
      try {
        if (!(await stat(image)).isFile()) throw new Error('not a regular file');
      } catch (e) {
        throw new BlocksnapError('E_SNAPSHOT', `image ${image} of volume ${volume.name} is unusable`, { cause: e });
      }
      await assertMountpoint(volume.mountpoint);
      const dir = snapshotDirOf(image);
      await mkdir(dir, { recursive: true, mode: 0o700 }).catch((e: unknown) => {
        throw new BlocksnapError('E_SNAPSHOT', `cannot create snapshot directory ${dir}`, { cause: e });
      });
      await this.remember(volume.name, dir);
      const dest = path.join(dir, `${id}.snap`);
      const tmp = path.join(dir, `.${id}.snap.tmp`);
      if (await exists(dest)) throw new BlocksnapError('E_SNAPSHOT', `snapshot ${id} already exists at ${dest}`);
      await rm(tmp, { force: true });
      items.push({ volume, image, id, dir, dest, tmp });
    }
    const dropMarkers = async () => {
      for (const it of items) if (it.marker) await removeStateFile(it.marker);
    };
    // Every marker is durable before the first freeze: a kill anywhere in the window is found at the next start.
    try {
      for (const it of items) {
        it.marker = await writeFreezeMarker(this.stateDir, {
          volume: it.volume.name, mountpoint: it.volume.mountpoint, device: it.volume.device, snapshotTemp: it.tmp,
          pid: process.pid, createdAt: new Date().toISOString(),
        });
      }
    } catch (e) {
      await dropMarkers().catch(() => undefined);
      throw e;
    }
    const ids = items.map((it) => it.id).join(', ');
    let frozenAt = 0;
    let thawedAt = 0;
    let failure: unknown;
    const mayBeFrozen: typeof items = [];
    try {
      for (const it of items) {
        mayBeFrozen.push(it);
        try {
          await freezeFilesystem(it.volume.mountpoint, { timeoutMs: this.freezeTimeoutMs });
        } catch (e) {
          // E_BUSY: someone else holds the freeze, thawing would break theirs;
          // E_CONFIG: the mount vanished before fsfreeze ran, nothing was frozen.
          if (isBlocksnapError(e, 'E_BUSY') || isBlocksnapError(e, 'E_CONFIG')) mayBeFrozen.pop();
          throw e;
        }
        frozenAt ||= performance.now();
      }
      if (opts.whileFrozen) for (const it of items) await opts.whileFrozen(it.volume);
      for (const it of items) await copyFile(it.image, it.tmp, constants.COPYFILE_FICLONE_FORCE);
    } catch (e) {
      failure = e;
    } finally {
      const thawErrors: unknown[] = [];
      const stillFrozen: string[] = [];
      for (const it of mayBeFrozen.reverse()) {
        const thawError = await thawWithRetry(it.volume.mountpoint);
        if (thawError) {
          thawErrors.push(thawError);
          stillFrozen.push(it.volume.mountpoint);
        }
      }
      thawedAt = performance.now();
      if (thawErrors.length) {
        for (const it of items) await rm(it.tmp, { force: true });
        // The markers stay: the next cleanupStale (agent start) thaws.
        throw new BlocksnapError('E_SNAPSHOT', `cannot thaw ${stillFrozen.join(', ')} after snapshot ${ids}; it may still be frozen`, {
          cause: failure ? new AggregateError([...thawErrors, failure]) : thawErrors.length === 1 ? thawErrors[0] : new AggregateError(thawErrors),
        });
      }
    }
    const freezeSeconds = frozenAt ? (thawedAt - frozenAt) / 1000 : 0;
    if (failure) {
      for (const it of items) await rm(it.tmp, { force: true });
      await dropMarkers();
      this.log.warn({ volumes: items.map((it) => it.volume.name), tag, freezeSeconds, err: failure }, 'snapshot failed; filesystem thawed');
      if (isBlocksnapError(failure)) throw failure;
      throw new BlocksnapError('E_SNAPSHOT', `cannot clone ${items.map((it) => it.image).join(', ')}: ${(failure as Error).message}`, { cause: failure });
    }
    const published: string[] = [];
    try {
      for (const it of items) {
        const fh = await open(it.tmp, 'r');
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
        await rename(it.tmp, it.dest);
        published.push(it.dest);
        await fsyncDir(it.dir);
      }
    } catch (e) {
      // A group is published whole or not at all.
      for (const it of items) await rm(it.tmp, { force: true });
      for (const d of published) await rm(d, { force: true });
      throw new BlocksnapError('E_SNAPSHOT', `cannot publish snapshot ${ids}`, { cause: e });
    } finally {
      await dropMarkers();
    }
    const snapshotSeconds = (performance.now() - started) / 1000;
    const createdAt = new Date();
    this.log.info({ volumes: items.map((it) => it.volume.name), tag, paths: items.map((it) => it.dest), freezeSeconds, snapshotSeconds }, 'snapshot created');
    return items.map((it) => ({ id: it.id, volume: it.volume.name, path: it.dest, createdAt, freezeSeconds, snapshotSeconds }));
  }

  async remove(snapshot: Snapshot): Promise<void> {
    // Only ever delete a file this provider named: <...>/.blocksnap/<id>.snap.
    if (path.basename(snapshot.path) !== `${snapshot.id}.snap` || path.basename(path.dirname(snapshot.path)) !== SNAP_DIR) {
      throw new BlocksnapError('E_SNAPSHOT', `${snapshot.path} is not a reflink snapshot of ${snapshot.id}`);
    }
    try {
      await rm(snapshot.path, { force: true });
      await fsyncDir(path.dirname(snapshot.path)).catch(() => undefined);
    } catch (e) {
      throw new BlocksnapError('E_SNAPSHOT', `cannot remove snapshot ${snapshot.id}`, { cause: e });
    }
  }

  async list(): Promise<Snapshot[]> {
    return (await this.scan()).snapshots;
  }

  /** What `cleanupStale(keep)` would release, without touching anything. */
  async inspectStale(keep: Set<string> = new Set()): Promise<StaleReport> {
    const { snapshots, temps } = await this.scan();
    const frozen = (await readFreezeMarkers(this.stateDir)).filter(({ marker }) => !this.inFlight.has(marker.volume));
    return { frozen, snapshots: snapshots.filter((s) => !keep.has(s.id) && !this.inFlight.has(s.volume)), temps };
  }

  async cleanupStale(keep: Set<string> = new Set()): Promise<string[]> {
    const report = await this.inspectStale(keep);
    const released: string[] = [];
    const errors: unknown[] = [];
    // Markers of volumes in flight in this process are skipped (as inspectStale reports them).
    const stale = await thawStaleFreezes(this.stateDir, this.inFlight, async (marker, outcome) => {
      this.log.warn({ volume: marker.volume, mountpoint: marker.mountpoint, outcome }, 'stale freeze marker: thaw');
      if (marker.snapshotTemp && path.basename(path.dirname(marker.snapshotTemp)) === SNAP_DIR) {
        await rm(marker.snapshotTemp, { force: true });
      }
    });
    released.push(...stale.released);
    errors.push(...stale.errors.map((e) => toBlocksnapError(e, 'E_SNAPSHOT')));
    for (const t of report.temps) {
      await rm(t, { force: true }).then(
        () => released.push(`temp:${t}`),
        (e: unknown) => errors.push(e),
      );
    }
    for (const s of report.snapshots) {
      await this.remove(s).then(
        () => released.push(`snapshot:${s.id}`),
        (e: unknown) => errors.push(e),
      );
    }
    if (released.length) this.log.info({ released }, 'released stale snapshot state');
    if (errors.length) {
      throw new BlocksnapError('E_SNAPSHOT', `cleanup of stale snapshots failed ${errors.length} time(s)`, {
        cause: new AggregateError(errors),
      });
    }
    return released;
  }

  private async remember(volume: string, dir: string): Promise<void> {
    const registry = await readVolumeRegistry(this.stateDir);
    if (registry.get(volume) === dir) return;
    registry.set(volume, dir);
    await writeVolumeRegistry(this.stateDir, registry);
  }

  private async knownVolumes(): Promise<Map<string, Set<string>>> {
    const byVolume = new Map<string, Set<string>>();
    const add = (v: string, d: string) => byVolume.set(v, (byVolume.get(v) ?? new Set()).add(d));
    for (const [v, d] of this.configured) add(v, d);
    for (const [v, d] of await readVolumeRegistry(this.stateDir)) if (VOLUME_NAME.test(v)) add(v, d);
    return byVolume;
  }

  private async scan(): Promise<{ snapshots: Snapshot[]; temps: string[] }> {
    const snapshots: Snapshot[] = [];
    const temps: string[] = [];
    for (const [volume, dirs] of await this.knownVolumes()) {
      for (const dir of dirs) {
        let names: string[];
        try {
          names = await readdir(dir);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
          throw new BlocksnapError('E_SNAPSHOT', `cannot list ${dir}`, { cause: e });
        }
        for (const name of names.sort()) {
          if (name.startsWith(`.${volume}@`) && name.endsWith('.snap.tmp')) {
            if (!this.inFlight.has(volume)) temps.push(path.join(dir, name));
            continue;
          }
          if (!name.startsWith(`${volume}@`) || !name.endsWith('.snap')) continue;
          const id = name.slice(0, -'.snap'.length);
          if (!TAG.test(id.slice(volume.length + 1))) continue;
          const file = path.join(dir, name);
          const st = await stat(file).catch(() => undefined);
          if (!st) continue;
          const createdAt = st.birthtimeMs > 0 ? st.birthtime : st.mtime;
          snapshots.push({ id, volume, path: file, createdAt, freezeSeconds: 0, snapshotSeconds: 0 });
        }
      }
    }
    return { snapshots, temps };
  }
}

async function exists(p: string): Promise<boolean> {
  return stat(p).then(
    () => true,
    () => false,
  );
}

export { freezeMarkerPath };
