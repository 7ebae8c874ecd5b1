/**
 * The identity proof of a file-backed volume (volume-identity.ts): image
 * file → loop device → mounted filesystem.
 *
 * - the loop device's backing file IS the configured image: same filesystem
 *   device and inode (LOOP_GET_STATUS64's lo_device/lo_inode, read through
 *   losetup(8); sysfs only has the path, which a rename or a replaced file
 *   makes lie). The loop holds the inode, so its number cannot be reused
 *   while attached;
 * - the loop maps the whole file (offset 0, no size limit short of it) and
 *   the device is exactly as large as the image;
 * - the filesystem mounted at the mountpoint (the topmost mount there) is on
 *   that device: its major:minor in /proc/self/mountinfo is the device's.
 * Every mismatch found is reported, each with what the configuration says
 * and what the system says.
 */
import { access, stat } from 'node:fs/promises';
import { execa } from 'execa';
import { readBlockDeviceInfo, splitDev, type BlockDeviceInfo } from '../cbt/device-identity.js';
import { findMount } from './fsfreeze.js';
import type { VolumeSpec } from './snapshot-provider.js';
import { devString, VolumeIdentityError, type IdentityField, type IdentityMismatch, type VolumeIdentity } from './volume-identity.js';

export interface LoopBacking {
  /** major:minor of the filesystem holding the backing file. */
  dev: string;
  ino: string;
  offset: string;
  sizelimit: string;
}

/** The backing file of loop device `device` (major:minor given), or null if it is not a loop device. */
export async function readLoopBacking(device: string, major: number, minor: number): Promise<LoopBacking | null> {
  const isLoop = await access(`/sys/dev/block/${major}:${minor}/loop`).then(() => true, () => false);
  if (!isLoop) return null;
  const r = await execa('losetup', ['--list', '--noheadings', '--raw', '--output', 'BACK-MAJ:MIN,BACK-INO,OFFSET,SIZELIMIT', device], {
    reject: false, stdin: 'ignore', timeout: 10_000,
  });
  // --raw escapes blanks inside a value as \x20 (BACK-MAJ:MIN is padded): split, then unescape and trim.
  const fields = String(r.stdout).trim().split(/\s+/).map((f) => f.replace(/\\x([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16))).trim());
  if (r.exitCode !== 0 || fields.length !== 4 || !/^\d+:\d+$/.test(fields[0]!) || !fields.slice(1).every((f) => /^\d+$/.test(f))) {
    throw new Error(`losetup cannot tell the backing file of ${device}: ${String(r.stderr || r.stdout || r.shortMessage).trim()}`);
  }
  const [dev, ino, offset, sizelimit] = fields as [string, string, string, string];
  return { dev, ino, offset, sizelimit };
}

export async function proveLoopVolume(volume: VolumeSpec): Promise<VolumeIdentity> {
  const refuse = (field: IdentityField, configured: string, found: string, cause?: unknown) =>
    new VolumeIdentityError(volume.name, [{ field, configured, found }], { cause });
  if (!volume.image) throw refuse('image', '(none)', 'no image: the reflink provider snapshots an image file');
  const image = volume.image;

  let img;
  try {
    img = await stat(image, { bigint: true });
  } catch (e) {
    throw refuse('image', image, `cannot stat it (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`, e);
  }
  if (!img.isFile()) throw refuse('image', image, 'not a regular file');
  const imgDev = splitDev(img.dev);
  const imgId = `${image} (dev ${devString(imgDev.major, imgDev.minor)}, inode ${img.ino})`;

  let dev: BlockDeviceInfo;
  try {
    dev = await readBlockDeviceInfo(volume.device);
  } catch (e) {
    throw refuse('device', volume.device, (e as Error).message, e);
  }
  const { major, minor } = dev.identity;
  const devId = `${volume.device} (${devString(major, minor)})`;
  if (dev.traceMajor !== major || dev.traceMinor !== minor) {
    throw refuse('device', devId, `a partition of ${devString(dev.traceMajor, dev.traceMinor)}, not the loop device of image ${image}`);
  }
  let loop: LoopBacking | null;
  try {
    loop = await readLoopBacking(volume.device, major, minor);
  } catch (e) {
    throw refuse('device', devId, (e as Error).message, e);
  }
  if (!loop) throw refuse('device', devId, `not a loop device, so not backed by image ${image}`);

  const mismatches: IdentityMismatch[] = [];
  if (loop.dev !== devString(imgDev.major, imgDev.minor) || loop.ino !== img.ino.toString()) {
    mismatches.push({ field: 'image', configured: imgId, found: `${devId} is backed by another file (dev ${loop.dev}, inode ${loop.ino})` });
  } else if (loop.offset !== '0' || (loop.sizelimit !== '0' && BigInt(loop.sizelimit) !== img.size)) {
    mismatches.push({ field: 'device', configured: devId, found: `maps only part of ${image} (offset ${loop.offset}, size limit ${loop.sizelimit})` });
  }
  if (BigInt(dev.identity.size) !== img.size) {
    mismatches.push({ field: 'size', configured: `image ${image}: ${img.size} bytes`, found: `device ${devId}: ${dev.identity.size} bytes` });
  }
  const mount = await findMount(volume.mountpoint);
  if (!mount) {
    mismatches.push({ field: 'mountpoint', configured: volume.mountpoint, found: 'not a mount point' });
  } else if (mount.device !== devString(major, minor)) {
    mismatches.push({
      field: 'mountpoint',
      configured: `${volume.mountpoint} on ${devId}`,
      found: `the ${mount.fstype} filesystem of ${mount.source} (${mount.device}) is mounted there`,
    });
  }
  if (mismatches.length) throw new VolumeIdentityError(volume.name, mismatches);
  return {
    volume: volume.name,
    device: { path: volume.device, ...dev.identity },
    backing: { kind: 'file', path: image, dev: loop.dev, ino: loop.ino, size: Number(img.size) },
    mount: { path: mount!.mountPoint, dev: mount!.device, fstype: mount!.fstype },
  };
}
