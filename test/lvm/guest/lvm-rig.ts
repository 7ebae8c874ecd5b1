/**
 * Inside the guest: a volume group on the guest's first disk (/dev/ubda)
 * with thin or plain LVs carrying ext4, mounted under /mnt. The guest is
 * thrown away after its run; teardown still releases what was made, so
 * several suites may share one guest.
 */
import { mkdir } from 'node:fs/promises';
import { execa } from 'execa';
import type { VolumeSpec } from '../../../agent/snapshot/snapshot-provider.js';

export const VG = 'bsnvg';
export const POOL = 'pool';

export const sh = async (cmd: string, args: string[]) => (await execa(cmd, args, { stdin: 'ignore' })).stdout;

export interface LvmRig {
  volumes: VolumeSpec[];
  teardown(): Promise<void>;
}

export interface LvmRigOptions {
  /** LVs to make: thin (in a pool) or plain (classic snapshots). */
  kind: 'thin' | 'plain';
  names: string[];
  sizeMiB: number;
  /** Thin pool size (thin) in MiB. */
  poolMiB?: number;
  /** Thin pool block size in KiB (default 64: one tracker chunk). */
  poolChunkKiB?: number;
  disk?: string;
  mkfs?: boolean;
}

export async function makeVg(disk = process.env.BSN_LVM_DISK ?? '/dev/ubda'): Promise<void> {
  await sh('pvcreate', ['-q', '-ff', '-y', disk]);
  await sh('vgcreate', ['-q', VG, disk]);
}

export async function makeLvmRig(opts: LvmRigOptions): Promise<LvmRig> {
  await makeVg(opts.disk);
  if (opts.kind === 'thin') {
    await sh('lvcreate', ['-q', '-y', '-L', `${opts.poolMiB ?? 512}M`, '--chunksize', `${opts.poolChunkKiB ?? 64}k`, '-Zn', '-T', `${VG}/${POOL}`]);
  }
  const volumes: VolumeSpec[] = [];
  for (const name of opts.names) {
    if (opts.kind === 'thin') await sh('lvcreate', ['-q', '-y', '-V', `${opts.sizeMiB}M`, '-T', `${VG}/${POOL}`, '-n', name]);
    else await sh('lvcreate', ['-q', '-y', '-L', `${opts.sizeMiB}M`, '-n', name, VG]); // -y: wipe an old filesystem signature left where an earlier suite's LV was
    const device = `/dev/${VG}/${name}`;
    const mountpoint = `/mnt/${name}`;
    if (opts.mkfs !== false) {
      await sh('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', device]);
      await mkdir(mountpoint, { recursive: true });
      await sh('mount', [device, mountpoint]);
    }
    volumes.push({ name, device, mountpoint, chunkSize: 65536 });
  }
  return {
    volumes,
    teardown: async () => {
      for (const v of volumes) await execa('umount', [v.mountpoint], { reject: false });
      await execa('vgremove', ['-q', '-f', VG], { reject: false });
      await execa('pvremove', ['-q', '-f', opts.disk ?? process.env.BSN_LVM_DISK ?? '/dev/ubda'], { reject: false });
    },
  };
}
