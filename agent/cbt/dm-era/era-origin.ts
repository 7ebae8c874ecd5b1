/**
 * Whether a block device is an era target stacked on another device: the
 * dm-era tracker's device is an `era` target over the volume (the LV), the
 * filesystem is mounted on it, and the LVM provider snapshots the LV under
 * it. The LVM identity proof (agent/snapshot/lvm/lvm-volume-identity.ts)
 * accepts such a device for an LV only if its whole table is one era target
 * over exactly that LV, covering all of it: then the era device's bytes are
 * the LV's bytes and the LV's snapshot is a snapshot of the filesystem.
 */
import { readFile } from 'node:fs/promises';
import { lvm } from '../../snapshot/lvm/lvm-cli.js';

export interface EraStack {
  /** dm name of the era device. */
  name: string;
  /** major:minor of the device the era target maps onto. */
  origin: string;
  /** Length of the era mapping in bytes (it starts at sector 0). */
  bytes: number;
}

/** The era stack of block device M:m, or null if it is not a one-target era device. */
export async function eraStackOf(major: number, minor: number): Promise<EraStack | null> {
  const name = (await readFile(`/sys/dev/block/${major}:${minor}/dm/name`, 'utf8').catch(() => '')).trim();
  if (!name) return null;
  const table = (await lvm('dmsetup', ['table', name], { code: 'E_IDENTITY' }).catch(() => '')).trim();
  const lines = table.split('\n').filter(Boolean);
  if (lines.length !== 1) return null;
  // `START LENGTH era META_DEV ORIGIN_DEV BLOCK_SECTORS`, devices as major:minor.
  const f = lines[0]!.split(/\s+/);
  if (f[0] !== '0' || f[2] !== 'era' || !/^\d+:\d+$/.test(f[4] ?? '')) return null;
  return { name, origin: f[4]!, bytes: Number(f[1]) * 512 };
}
