/**
 * The identity proof of an LVM volume (volume-identity.ts): the configured
 * LV exists in the named VG and is active; the configured device is that
 * LV's dm device (same major:minor); the filesystem mounted at the
 * mountpoint is on that device. For dm-era tracking the device may instead
 * be an era target over the whole LV (the filesystem mounted on it). A volume names its LV as `lv: "VG/LV"`;
 * without it the device path (/dev/VG/LV) names it.
 */
import { stat } from 'node:fs/promises';
import { readBlockDeviceInfo, splitDev } from '../../cbt/device-identity.js';
import { findMount } from '../fsfreeze.js';
import type { VolumeSpec } from '../snapshot-provider.js';
import { devString, VolumeIdentityError, type IdentityMismatch, type VolumeIdentity } from '../volume-identity.js';
import { eraStackOf } from '../../cbt/dm-era/era-origin.js';
import { lvInfo, type LvInfo } from './lvm-cli.js';

/** "VG/LV" of a volume: its `lv`, or its device path /dev/VG/LV. */
export function lvNameOf(volume: VolumeSpec): string {
  if (volume.lv) return volume.lv;
  const m = /^\/dev\/([^/]+)\/([^/]+)$/.exec(volume.device);
  if (!m || m[1] === 'mapper') {
    throw new VolumeIdentityError(volume.name, [{ field: 'device', configured: volume.device, found: 'not /dev/VG/LV and no "lv" configured' }]);
  }
  return `${m[1]}/${m[2]}`;
}

export async function proveLvmVolume(volume: VolumeSpec): Promise<VolumeIdentity & { lv: LvInfo }> {
  const name = lvNameOf(volume);
  let lv: LvInfo;
  try {
    lv = await lvInfo(name, 'E_IDENTITY');
  } catch (e) {
    throw new VolumeIdentityError(volume.name, [{ field: 'device', configured: `LV ${name}`, found: (e as Error).message }], { cause: e });
  }
  const lvDev = devString(lv.major, lv.minor);
  if (!(lv.major >= 0)) {
    throw new VolumeIdentityError(volume.name, [{ field: 'device', configured: `LV ${name}`, found: 'the LV is not active' }]);
  }
  const mismatches: IdentityMismatch[] = [];
  let devId = volume.device;
  let identity;
  /** The device the filesystem must be on: the LV, or an era target over it. */
  let fsDev = lvDev;
  try {
    const info = await readBlockDeviceInfo(volume.device);
    identity = info.identity;
    devId = `${volume.device} (${devString(identity.major, identity.minor)})`;
    if (identity.major !== lv.major || identity.minor !== lv.minor) {
      // dm-era: the filesystem is on an era target over the whole LV (its bytes are the LV's).
      const era = await eraStackOf(identity.major, identity.minor);
      if (era && era.origin === lvDev && era.bytes === lv.size) fsDev = devString(identity.major, identity.minor);
      else mismatches.push({ field: 'device', configured: devId, found: `LV ${name} is ${lvDev}${era ? ` (${volume.device} is an era target over ${era.origin}, ${era.bytes} bytes)` : ''}` });
    }
  } catch (e) {
    throw new VolumeIdentityError(volume.name, [{ field: 'device', configured: volume.device, found: (e as Error).message }], { cause: e });
  }
  const mount = await findMount(volume.mountpoint);
  if (!mount) {
    mismatches.push({ field: 'mountpoint', configured: volume.mountpoint, found: 'not a mount point' });
  } else {
    // mountinfo's major:minor and the directory's st_dev must both be the LV's.
    const st = await stat(volume.mountpoint, { bigint: true });
    const d = splitDev(st.dev);
    if (mount.device !== fsDev || devString(d.major, d.minor) !== fsDev) {
      mismatches.push({
        field: 'mountpoint',
        configured: `${volume.mountpoint} on ${fsDev === lvDev ? `LV ${name}` : volume.device} (${fsDev})`,
        found: `the ${mount.fstype} filesystem of ${mount.source} (${mount.device}) is mounted there`,
      });
    }
  }
  if (mismatches.length) throw new VolumeIdentityError(volume.name, mismatches);
  return {
    volume: volume.name,
    device: { path: volume.device, ...identity },
    backing: { kind: `lvm-${lv.segtype}`, path: name, dev: lvDev, ino: '0', size: lv.size },
    mount: { path: mount!.mountPoint, dev: mount!.device, fstype: mount!.fstype },
    lv,
  };
}
