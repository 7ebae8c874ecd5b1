/**
 * Freeze marker, `STATE/freeze-<volume>.json`: written durably *before*
 * `fsfreeze -f` and removed after a successful thaw, so a process killed
 * inside the freeze window leaves a record the next start uses to thaw
 * (`thawStaleFreezes`). Shared by every provider that freezes a filesystem
 * itself: reflink (always), lvm-classic/lvm-thin (a filesystem on a device
 * stacked over the LV, which LVM's own suspend does not freeze).
 *
 *   { "format": "blocksnap-freeze-marker", "version": 1,
 *     "volume": "pgdata",                 // volume name
 *     "mountpoint": "/srv/pgdata",        // what was frozen (required)
 *     "device": "/dev/loop3",             // what it was on: a stale marker thaws only that
 *     "snapshotTemp": "/pool/.blocksnap/.pgdata@t1.snap.tmp" | null,   // reflink only
 *     "pid": 1234, "createdAt": "ISO-8601" }
 *
 * Written temp + fsync + rename + directory fsync.
 */
import { mkdir, readFile, readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';
import { splitDev } from '../cbt/device-identity.js';
import { findMount, freezeFilesystem, thawFilesystem } from './fsfreeze.js';

export const FREEZE_MARKER_FORMAT = 'blocksnap-freeze-marker';

export interface FreezeMarker {
  format: typeof FREEZE_MARKER_FORMAT;
  version: 1;
  volume: string;
  mountpoint: string;
  device?: string;
  snapshotTemp?: string | null;
  pid?: number;
  createdAt?: string;
}

export function freezeMarkerPath(stateDir: string, volume: string): string {
  return path.join(stateDir, `freeze-${volume}.json`);
}

export async function writeFreezeMarker(stateDir: string, marker: Omit<FreezeMarker, 'format' | 'version'>): Promise<string> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const file = freezeMarkerPath(stateDir, marker.volume);
  const full: FreezeMarker = { format: FREEZE_MARKER_FORMAT, version: 1, ...marker };
  await writeFileDurably(file, JSON.stringify(full, null, 2) + '\n');
  return file;
}

export async function removeStateFile(file: string): Promise<void> {
  await rm(file, { force: true });
  await fsyncDir(path.dirname(file)).catch(() => undefined);
}

/** Every freeze marker in `stateDir` with the file it came from; unreadable ones are E_FORMAT errors. */
export async function readFreezeMarkers(stateDir: string): Promise<Array<{ file: string; marker: FreezeMarker }>> {
  let names: string[];
  try {
    names = await readdir(stateDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new BlocksnapError('E_SNAPSHOT', `cannot read state directory ${stateDir}`, { cause: e });
  }
  const out: Array<{ file: string; marker: FreezeMarker }> = [];
  for (const name of names.filter((n) => /^freeze-.+\.json$/.test(n)).sort()) {
    const file = path.join(stateDir, name);
    let m: Partial<FreezeMarker>;
    try {
      m = JSON.parse(await readFile(file, 'utf8')) as Partial<FreezeMarker>;
    } catch (e) {
      throw new BlocksnapError('E_FORMAT', `unreadable freeze marker ${file}`, { cause: e });
    }
    if (m.format !== FREEZE_MARKER_FORMAT || m.version !== 1 || typeof m.mountpoint !== 'string' || typeof m.volume !== 'string') {
      throw new BlocksnapError('E_FORMAT', `${file} is not a version 1 freeze marker`);
    }
    out.push({ file, marker: m as FreezeMarker });
  }
  return out;
}

/** Thaws `mountpoint`, three tries; the last error, or undefined once thawed (or not frozen). */
export async function thawWithRetry(mountpoint: string): Promise<unknown> {
  let last: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await thawFilesystem(mountpoint, { ignoreNotFrozen: true });
      return undefined;
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
    }
  }
  return last;
}

/**
 * Runs `fn` with the filesystem at `volume.mountpoint` frozen, under a
 * freeze marker: the marker is durable before the freeze, the filesystem is
 * thawed whatever `fn` does (also after a freeze that failed late, e.g. timed
 * out: it may have frozen anyway), and the marker goes only once thawed. If
 * the thaw fails the marker stays (the next start thaws) and the error says
 * the filesystem may still be frozen. A freeze refused because someone else
 * holds one (E_BUSY) or because the mount vanished (E_CONFIG) froze nothing:
 * no thaw then, which would break theirs.
 */
export async function frozenDuring<T>(
  stateDir: string,
  volume: { name: string; mountpoint: string; device?: string },
  fn: () => Promise<T>,
  opts: { timeoutMs?: number } = {},
): Promise<T> {
  const marker = await writeFreezeMarker(stateDir, {
    volume: volume.name, mountpoint: volume.mountpoint, device: volume.device, snapshotTemp: null,
    pid: process.pid, createdAt: new Date().toISOString(),
  });
  let failure: unknown = null;
  let result: T | undefined;
  try {
    await freezeFilesystem(volume.mountpoint, opts);
  } catch (e) {
    if (isBlocksnapError(e, 'E_BUSY') || isBlocksnapError(e, 'E_CONFIG')) {
      await removeStateFile(marker);
      throw e;
    }
    failure = e;
  }
  if (failure === null) {
    try {
      result = await fn();
    } catch (e) {
      failure = e;
    }
  }
  const thawError = await thawWithRetry(volume.mountpoint);
  if (thawError) {
    throw new BlocksnapError('E_SNAPSHOT', `cannot thaw ${volume.mountpoint}; it may still be frozen (its freeze marker stays: the next start thaws it)`, {
      cause: failure === null ? thawError : new AggregateError([thawError, failure]),
    });
  }
  await removeStateFile(marker);
  if (failure !== null) throw failure;
  return result as T;
}

export type StaleFreezeOutcome = 'thawed' | 'not-frozen' | 'unmounted' | 'another-device';

/**
 * Whether the filesystem now mounted at the marker's mountpoint is proven to
 * be on another block device than the one the marker names: a freeze there
 * is then not ours to undo. `mountDevice` is mountinfo's major:minor.
 * Anything that cannot be compared (no device in the marker, a device gone or
 * not a block device, an anonymous device number — major 0, as btrfs reports
 * for every mount — in mountinfo) counts as ours: a database left frozen is
 * the worse mistake.
 */
export async function onAnotherDevice(marker: Pick<FreezeMarker, 'device'>, mountDevice: string): Promise<boolean> {
  if (!marker.device || mountDevice.startsWith('0:')) return false;
  const st = await stat(marker.device, { bigint: true }).catch(() => null);
  if (!st?.isBlockDevice()) return false;
  const { major, minor } = splitDev(st.rdev);
  return `${major}:${minor}` !== mountDevice;
}

/**
 * What a killed process's freeze markers name, released: each filesystem
 * still mounted there (on the device the marker names) is thawed if it is
 * frozen, and the marker removed. Markers of `skip` volumes (a snapshot in
 * flight in this process) are left. Returns `thawed:<mountpoint>` for each
 * filesystem that really was frozen and `marker:<volume>` for each marker
 * removed; `onMarker` may release more of a marker (reflink: its temporary
 * clone) before it is removed.
 */
export async function thawStaleFreezes(
  stateDir: string,
  skip: ReadonlySet<string>,
  onMarker?: (marker: FreezeMarker, outcome: StaleFreezeOutcome) => Promise<void>,
): Promise<{ released: string[]; errors: unknown[] }> {
  const released: string[] = [];
  const errors: unknown[] = [];
  for (const { file, marker } of await readFreezeMarkers(stateDir)) {
    if (skip.has(marker.volume)) continue;
    try {
      const mount = await findMount(marker.mountpoint);
      const outcome: StaleFreezeOutcome = !mount
        ? 'unmounted'
        : (await onAnotherDevice(marker, mount.device)) ? 'another-device' : await thawFilesystem(marker.mountpoint, { ignoreNotFrozen: true });
      if (outcome === 'thawed') released.push(`thawed:${marker.mountpoint}`);
      await onMarker?.(marker, outcome);
      await removeStateFile(file);
      released.push(`marker:${marker.volume}`);
    } catch (e) {
      errors.push(e);
    }
  }
  return { released, errors };
}
