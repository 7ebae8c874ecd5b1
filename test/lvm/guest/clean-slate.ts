/**
 * Setup file of the guest vitest (vitest.guest.config.ts): the guest suites
 * run one after the other in one guest on one disk (guest-suites.test.ts),
 * and each makes volume group bsnvg on it. Each tears down what it made; if
 * one failed half-way, this clears what it left (mounts under /mnt, device-
 * mapper devices, the volume group) before the next file starts, so one
 * failure is reported once rather than as every later suite failing too.
 * Then it discards the disks: each suite starts on zeros, as on the fresh
 * disk each had in its own guest. A clean guest costs one `dmsetup ls`, one
 * `vgs` and one `blkdiscard`.
 */
import { readdir, rm } from 'node:fs/promises';
import { execa } from 'execa';
import { beforeAll } from 'vitest';

beforeAll(async () => {
  const dm = (await execa('dmsetup', ['ls'], { reject: false })).stdout.trim();
  const vgs = (await execa('vgs', ['--noheadings', '-o', 'vg_name'], { reject: false })).stdout.trim();
  // Without udev, LVM keeps /dev/VG itself; a folder left after vgremove (seen after bad-input's
  // thin-pool-filling case: bsn.badt.j5) makes the next `vgcreate VG` fail with "already exists in filesystem".
  for (const d of (await readdir('/dev')).filter((n) => n.startsWith('bsn') && !vgs.split(/\s+/).includes(n))) {
    const left = await readdir(`/dev/${d}`).catch(() => null);
    if (left === null) continue;
    console.warn(`clean-slate: /dev/${d} left without its volume group (${left.join(' ')}); removing it`);
    await rm(`/dev/${d}`, { recursive: true, force: true });
  }
  if ((!dm || /No devices found/.test(dm)) && !vgs) return discardDisks();
  console.warn(`clean-slate: an earlier guest suite left device-mapper devices [${dm}] and volume groups [${vgs}]; removing them`);
  const mounts = (await execa('sh', ['-c', "awk '$2 ~ /^\\/mnt\\// {print $2}' /proc/mounts"], { reject: false })).stdout.split('\n').filter(Boolean);
  for (const m of mounts.reverse()) await execa('umount', ['-l', m], { reject: false });
  await execa('dmsetup', ['remove_all', '-f'], { reject: false });
  for (const vg of vgs.split(/\s+/).filter(Boolean)) await execa('vgremove', ['-q', '-f', vg], { reject: false });
  await execa('sh', ['-c', 'for d in /dev/ubd[a-z]; do pvremove -q -ff -y $d; wipefs -a -q $d; done'], { reject: false });
  await discardDisks();
}, 120_000);

/**
 * Zeroes the disks (ubd punches holes in the sparse file), as a fresh disk
 * per suite was: an LV made where an earlier suite's ext4 was would find its
 * signature (lvcreate without -y then refuses).
 */
async function discardDisks(): Promise<void> {
  const r = await execa('sh', ['-c', 'for d in /dev/ubd[a-z]; do blkdiscard $d || exit 1; done'], { reject: false });
  if (r.exitCode !== 0) console.warn(`clean-slate: blkdiscard failed (${r.stderr.trim()}): later LVs may find earlier signatures`);
}
