import { constants } from 'node:fs';
import { link, lstat, open, readdir, readFile, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlocksnapError } from '../../proto/errors.js';
import { fsyncDir } from '../../proto/shared/durable-file.js';
import { FileBlockDevice } from '../blockdev/file-block-device.js';
import { splitDev } from '../cbt/device-identity.js';

/**
 * Where a restore writes (DESIGN.md §4.6), checked before a byte is written.
 * Every refusal is E_USAGE (exit 2) naming the target and the reason.
 *
 * - A DEVICE (block device) is opened O_EXCL: the kernel refuses it while a
 *   filesystem on it is mounted, or a device-mapper/md/loop-partition holder
 *   has it — the same check mkfs uses. It is also compared with
 *   /proc/self/mountinfo (a nicer message) and must be at least the image's size.
 * - A FILE is written to a temp file beside it and renamed into place once
 *   complete and fsync'ed, so a failed restore leaves the old FILE (or none).
 *   An existing non-empty FILE needs `force`; a FILE that backs a loop device
 *   (its contents live under a mounted filesystem or a running export) is refused.
 * - A configured volume (its device) may only be the target of a changed-only
 *   restore of one of its own images: anything else would write under a live
 *   tracker and digest map without them knowing; the volume's image file (the
 *   loop's backing file) is never a target — writes there bypass the tracker.
 */
export interface TargetSpec {
  path: string;
  force: boolean;
  changedOnly: boolean;
}

export interface ConfiguredVolume {
  name: string;
  device: string;
  image?: string;
}

export interface OpenTarget {
  path: string;
  kind: 'device' | 'file';
  /** Where bytes go: the device, or the temp file of a FILE target. */
  handle: FileHandle;
  /** Bytes available (device size; for a file: unlimited, it is extended). */
  capacity: number;
  /** A new (or --force-emptied) file: every byte not written is a hole already. */
  startsEmpty: boolean;
  /** The configured volume this device is, if any. */
  volume: ConfiguredVolume | null;
  /** Called on success: a FILE's temp file is renamed into place. */
  commit(): Promise<void>;
  /** Called on failure: a FILE's temp file is removed; says what state the target is in (`touched`: anything was written). */
  abandon(touched: boolean): Promise<string>;
}

const usage = (path: string, why: string) => new BlocksnapError('E_USAGE', `restore target ${path}: ${why}`);

/** Mount points whose filesystem is on device `rdev` (major:minor), from /proc/self/mountinfo. */
export async function mountsOf(rdev: number): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const want = `${major(rdev)}:${minor(rdev)}`;
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f[2] === want) out.push(unescapeMount(f[4] ?? ''));
  }
  return out;
}

/** Loop devices whose backing file is (dev, ino). */
export async function loopsBackedBy(dev: number, ino: number): Promise<string[]> {
  const out: string[] = [];
  let names: string[] = [];
  try {
    names = (await readdir('/sys/block')).filter((n) => n.startsWith('loop'));
  } catch {
    return out;
  }
  for (const n of names) {
    let back: string;
    try {
      back = (await readFile(`/sys/block/${n}/loop/backing_file`, 'utf8')).trim().replace(/ \(deleted\)$/, '');
    } catch {
      continue; // not attached
    }
    try {
      const s = await stat(back);
      if (s.dev === dev && s.ino === ino) out.push(`/dev/${n}`);
    } catch {
      // backing file renamed or deleted: cannot be this file by path; the kernel's inode is unknown here
    }
  }
  return out;
}

export async function openTarget(spec: TargetSpec, imageSize: number, volumes: readonly ConfiguredVolume[], imageVolume: string): Promise<OpenTarget> {
  const entry = await lstat(spec.path).catch(() => null);
  if (entry?.isSymbolicLink()) throw usage(spec.path, 'is a symbolic link: name the device or file itself');
  let st;
  try {
    st = await stat(spec.path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw usage(spec.path, (e as Error).message);
    st = null;
  }
  if (st?.isBlockDevice()) return openDevice(spec, st.rdev, imageSize, volumes, imageVolume);
  if (st && !st.isFile()) throw usage(spec.path, 'is neither a block device nor a regular file');
  // A volume's own image file: its loop device is the volume, and writes to the file bypass the change tracker.
  if (st) {
    for (const v of volumes) {
      if (!v.image) continue;
      const vs = await stat(v.image).catch(() => null);
      if (vs && vs.dev === st.dev && vs.ino === st.ino) {
        throw usage(spec.path, `is the image file of configured volume ${v.name}: restore onto its device ${v.device} (with --changed-only), never the backing file`);
      }
    }
    const loops = await loopsBackedBy(st.dev, st.ino);
    if (loops.length) throw usage(spec.path, `backs loop device ${loops.join(', ')} (detach it first)`);
    if (st.size > 0 && !spec.force && !spec.changedOnly) throw usage(spec.path, `exists and is not empty (${st.size} bytes): use --force to replace it`);
  }
  if (spec.changedOnly) {
    if (!st) throw usage(spec.path, 'does not exist: --changed-only needs the volume to compare with');
    if (st.size < imageSize) throw usage(spec.path, `is ${st.size} bytes, smaller than the image (${imageSize} bytes)`);
    // In place: only differing chunks are written.
    const handle = await open(spec.path, constants.O_RDWR);
    return {
      path: spec.path, kind: 'file', handle, capacity: st.size, startsEmpty: false, volume: null,
      commit: async () => {
        await handle.sync();
        await handle.close();
      },
      abandon: async (touched) => {
        await handle.close().catch(() => undefined);
        return touched ? `${spec.path} was changed in place and is partly restored: run the restore again` : `${spec.path} is unchanged (nothing was written)`;
      },
    };
  }
  const dirStat = await stat(dirname(spec.path)).catch(() => null);
  if (!dirStat?.isDirectory()) throw usage(spec.path, 'its directory does not exist');
  const tmp = join(dirname(spec.path), `.${basename(spec.path)}.restore-${randomBytes(4).toString('hex')}`);
  const handle = await open(tmp, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
  await handle.truncate(imageSize);
  const existed = st !== null;
  return {
    path: spec.path, kind: 'file', handle, capacity: Number.MAX_SAFE_INTEGER, startsEmpty: true, volume: null,
    commit: async () => {
      await handle.sync();
      await handle.close();
      // No replace of something that appeared meanwhile unless --force said so.
      if (existed) await rename(tmp, spec.path);
      else {
        await link(tmp, spec.path).catch((e) => {
          throw usage(spec.path, `appeared during the restore (${(e as Error).message}); the restored image is left in ${tmp}`);
        });
        await unlink(tmp);
      }
      await fsyncDir(dirname(spec.path));
    },
    abandon: async () => {
      await handle.close().catch(() => undefined);
      await unlink(tmp).catch(() => undefined);
      return existed ? `${spec.path} is unchanged (the restore wrote to a temp file, now removed)` : `${spec.path} was not created`;
    },
  };
}

async function openDevice(spec: TargetSpec, rdev: number, imageSize: number, volumes: readonly ConfiguredVolume[], imageVolume: string): Promise<OpenTarget> {
  const mounts = await mountsOf(rdev);
  if (mounts.length) throw usage(spec.path, `is mounted at ${mounts.join(', ')}`);
  let volume: ConfiguredVolume | null = null;
  for (const v of volumes) {
    const vs = await stat(v.device).catch(() => null);
    if (vs?.isBlockDevice() && vs.rdev === rdev) volume = v;
  }
  if (volume && !spec.changedOnly) {
    throw usage(spec.path, `is configured volume ${volume.name} (tracked and backed up): only a --changed-only restore of one of its own images may write it`);
  }
  if (volume && volume.name !== imageVolume) {
    throw usage(spec.path, `is configured volume ${volume.name}, but the image is of volume ${imageVolume}`);
  }
  const holders = await readdir(`/sys/dev/block/${major(rdev)}:${minor(rdev)}/holders`).catch(() => [] as string[]);
  if (holders.length) throw usage(spec.path, `is held by ${holders.map((h) => `/dev/${h}`).join(', ')}`);
  let handle: FileHandle;
  try {
    // O_EXCL on a block device: EBUSY while it is mounted or claimed (the kernel's own check).
    handle = await open(spec.path, constants.O_RDWR | constants.O_EXCL);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw usage(spec.path, code === 'EBUSY' ? 'is in use (mounted or claimed by another driver)' : (e as Error).message);
  }
  let capacity: number;
  try {
    const d = await FileBlockDevice.open(spec.path);
    capacity = d.size;
    await d.close();
  } catch (e) {
    await handle.close();
    throw usage(spec.path, `cannot read its size: ${(e as Error).message}`);
  }
  if (capacity < imageSize) {
    await handle.close();
    throw usage(spec.path, `is ${capacity} bytes, smaller than the image (${imageSize} bytes)`);
  }
  return {
    path: spec.path, kind: 'device', handle, capacity, startsEmpty: false, volume,
    commit: async () => {
      await handle.sync();
      await handle.close();
    },
    abandon: async (touched) => {
      await handle.sync().catch(() => undefined);
      await handle.close().catch(() => undefined);
      if (!touched) return `${spec.path} is unchanged (nothing was written)`;
      return `${spec.path} is partly restored (its content is now neither the image nor what it was): run the restore again`;
    },
  };
}

function major(rdev: number): number {
  return splitDev(BigInt(rdev)).major;
}

function minor(rdev: number): number {
  return splitDev(BigInt(rdev)).minor;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}
