/**
 * The Tracker contract (test/agent/tracker.contract.ts) against the dm-era
 * tracker in the guest: per test a fresh era target (64 KiB blocks) with its
 * own metadata device. The contract's targets sit on dm-linear slices of
 * one LV made once per file: a `dmsetup create` is a fraction of an
 * `lvcreate` + `lvremove` in the ptrace'd guest, and the tracker only sees
 * an era target either way. The identity test needs the era over an LV and
 * makes its own.
 */
import { constants } from 'node:fs';
import { mkdir, open } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { DmEraTracker, cleanupStaleDmEra } from '../../../agent/cbt/dm-era/dm-era-tracker.js';
import { proveLvmVolume } from '../../../agent/snapshot/lvm/lvm-volume-identity.js';
import { VolumeIdentityError } from '../../../agent/snapshot/volume-identity.js';
import { CONTRACT_CHUNK, trackerContract, type ContractRig } from '../../agent/tracker.contract.js';
import { VG, makeVg, sh } from './lvm-rig.js';

const SIZE = 4 * 1024 * 1024;
const META = 4 * 1024 * 1024;
/** Slices of the file's LV: one per rig (the contract and the specifics make about 15). */
const SLOTS = 32;
let vgReady: Promise<void> | null = null;
let n = 0;
const log = pino({ level: 'silent' });

function eraRig(era: string, metadata: string, data: string, teardown: () => Promise<void>): ContractRig {
  const device = `/dev/mapper/${era}`;
  return {
    tracker: new DmEraTracker({ log }),
    device,
    deviceSize: SIZE,
    write: async (offset, length) => {
      const fh = await open(device, constants.O_WRONLY | constants.O_SYNC);
      try {
        await fh.write(randomBytes(length), 0, length, offset);
      } finally {
        await fh.close();
      }
    },
    discard: async (offset, length) => void (await sh('blkdiscard', ['-o', String(offset), '-l', String(length), device])),
    another: () => new DmEraTracker({ log }),
    teardown,
  };
}

async function makeEra(era: string, metadata: string, data: string): Promise<void> {
  await sh('dd', ['if=/dev/zero', `of=${metadata}`, 'bs=4k', 'count=1', 'oflag=direct', 'status=none']);
  await sh('dmsetup', ['create', era, '--table', `0 ${SIZE / 512} era ${metadata} ${data} ${CONTRACT_CHUNK / 512}`]);
  await sh('dmsetup', ['mknodes']);
}

/** An era target over a slice of the file's LV, its metadata on the next slice. */
async function makeRig(): Promise<ContractRig> {
  vgReady ??= (async () => {
    await makeVg();
    await sh('lvcreate', ['-q', '-y', '-L', `${(SLOTS * (SIZE + META)) / 1024 / 1024}M`, '-n', 'slices', VG]); // -y: wipe a signature an earlier suite left there
  })();
  await vgReady;
  const i = n++;
  if (i >= SLOTS) throw new Error(`more than ${SLOTS} rigs: raise SLOTS`);
  const name = `e${i}`;
  const at = (i * (SIZE + META)) / 512;
  await sh('dmsetup', ['create', `${name}data`, '--table', `0 ${SIZE / 512} linear /dev/${VG}/slices ${at}`]);
  await sh('dmsetup', ['create', `${name}meta`, '--table', `0 ${META / 512} linear /dev/${VG}/slices ${at + SIZE / 512}`]);
  await sh('dmsetup', ['mknodes']);
  await makeEra(`${name}era`, `/dev/mapper/${name}meta`, `/dev/mapper/${name}data`);
  return eraRig(`${name}era`, `/dev/mapper/${name}meta`, `/dev/mapper/${name}data`, async () => {
    await execa('dmsetup', ['remove', `${name}era`, `${name}meta`, `${name}data`], { reject: false });
  });
}

/** An era target over its own LV (the identity proof wants an LV under the era). */
async function makeLvRig(): Promise<ContractRig> {
  vgReady ??= makeVg();
  await vgReady;
  const name = `l${n++}`;
  await sh('lvcreate', ['-q', '-L', `${SIZE / 1024 / 1024}M`, '-n', name, VG]);
  await sh('lvcreate', ['-q', '-L', `${META / 1024 / 1024}M`, '-n', `${name}meta`, VG]);
  await makeEra(`${name}era`, `/dev/${VG}/${name}meta`, `/dev/${VG}/${name}`);
  return eraRig(`${name}era`, `/dev/${VG}/${name}meta`, `/dev/${VG}/${name}`, async () => {
    await execa('dmsetup', ['remove', `${name}era`], { reject: false });
    await sh('lvremove', ['-q', '-f', `${VG}/${name}`, `${VG}/${name}meta`]);
  });
}

trackerContract('dm-era (era target over a slice of an LV in a user-mode-linux guest)', makeRig);

describe('dm-era specifics', () => {
  afterAll(async () => {
    await execa('vgremove', ['-q', '-f', VG], { reject: false });
  });

  it('a checkpoint racing a switch (both take the era\'s metadata snapshot) leaves the tracker valid', async () => {
    const rig = await makeRig();
    try {
      await rig.tracker.start({ device: rig.device, chunkSize: CONTRACT_CHUNK, generation: 1 });
      await rig.tracker.prepareSwitch(); // a fresh start is invalid until the first switch
      await rig.tracker.completeSwitch();
      await rig.write(0, CONTRACT_CHUNK);
      // Before the queue, the second take_metadata_snap failed with EINVAL and invalidated the generation.
      await Promise.all([rig.tracker.checkpoint(), rig.tracker.prepareSwitch(), rig.tracker.checkpoint()]);
      await rig.tracker.checkpoint();
      const sw = await rig.tracker.completeSwitch();
      expect(sw.validity, JSON.stringify(sw.validity)).toMatchObject({ valid: true });
      expect(rig.tracker.validity()).toMatchObject({ valid: true });
      await rig.tracker.stop();
    } finally {
      await rig.teardown();
    }
  });

  it('volume identity: an era target over the whole LV is the volume\'s device; an era over another LV is refused', async () => {
    const rig = await makeLvRig(); // era l<n>era over LV l<n>
    const other = await makeLvRig();
    const lv = (r: ContractRig) => `${VG}/${r.device.split('/').pop()!.replace(/era$/, '')}`;
    const mnt = '/mnt/era-identity';
    try {
      await sh('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', rig.device]);
      await mkdir(mnt, { recursive: true });
      await sh('mount', [rig.device, mnt]);
      const ok = await proveLvmVolume({ name: 'v', device: rig.device, lv: lv(rig), mountpoint: mnt, chunkSize: CONTRACT_CHUNK });
      expect(ok.device.path).toBe(rig.device);
      // The same mount, but the configuration names the LV under another era target.
      const err = await proveLvmVolume({ name: 'v', device: other.device, lv: lv(rig), mountpoint: mnt, chunkSize: CONTRACT_CHUNK }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(VolumeIdentityError);
      expect((err as VolumeIdentityError).mismatches.map((m) => m.field).sort()).toEqual(['device', 'mountpoint']);
    } finally {
      await execa('umount', [mnt], { reject: false });
      // The next LV on these extents would find the ext4 signature and refuse to be created.
      await execa('wipefs', ['-a', '-q', rig.device], { reject: false });
      await other.teardown();
      await rig.teardown();
    }
  });

  it('cleanupStale drops a metadata snapshot a killed run left held', async () => {
    const rig = await makeRig();
    try {
      await sh('dmsetup', ['message', rig.device.split('/').pop()!, '0', 'take_metadata_snap']);
      expect(await cleanupStaleDmEra()).toEqual([`era metadata snapshot of ${rig.device.split('/').pop()}`]);
      expect(await cleanupStaleDmEra()).toEqual([]);
    } finally {
      await rig.teardown();
    }
  });
});
