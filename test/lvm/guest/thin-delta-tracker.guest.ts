/**
 * The Tracker contract (test/agent/tracker.contract.ts) against the
 * thin-delta tracker on a real thin LV in the guest: one pool for the file,
 * a fresh, fully provisioned thin LV per test (a discard of a never-written
 * thin block changes nothing, so the rig writes every block first).
 */
import { open } from 'node:fs/promises';
import { constants } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, describe, expect, it } from 'vitest';
import { ThinDeltaTracker, cleanupStaleThinDelta } from '../../../agent/cbt/thin-delta/thin-delta-tracker.js';
import { listLvs } from '../../../agent/snapshot/lvm/lvm-cli.js';
import { CONTRACT_CHUNK, trackerContract, type ContractRig } from '../../agent/tracker.contract.js';
import { POOL, VG, makeVg, sh } from './lvm-rig.js';

const SIZE = 4 * 1024 * 1024;
let vgReady: Promise<void> | null = null;
let n = 0;
const log = pino({ level: 'silent' });

async function writeAt(device: string, offset: number, length: number): Promise<void> {
  const fh = await open(device, constants.O_WRONLY | constants.O_SYNC);
  try {
    await fh.write(randomBytes(length), 0, length, offset);
  } finally {
    await fh.close();
  }
}

async function makeRig(): Promise<ContractRig> {
  vgReady ??= (async () => {
    await makeVg();
    await sh('lvcreate', ['-q', '-L', '256M', '--chunksize', `${CONTRACT_CHUNK / 1024}k`, '-Zn', '-T', `${VG}/${POOL}`]);
  })();
  await vgReady;
  const name = `t${++n}`;
  await sh('lvcreate', ['-q', '-V', `${SIZE / 1024 / 1024}M`, '-T', `${VG}/${POOL}`, '-n', name]);
  const device = `/dev/${VG}/${name}`;
  await sh('dd', ['if=/dev/urandom', `of=${device}`, 'bs=1M', `count=${SIZE / 1024 / 1024}`, 'oflag=direct', 'status=none']);
  return {
    tracker: new ThinDeltaTracker({ log }),
    device,
    deviceSize: SIZE,
    write: (offset, length) => writeAt(device, offset, length),
    discard: async (offset, length) => void (await sh('blkdiscard', ['-o', String(offset), '-l', String(length), device])),
    another: () => new ThinDeltaTracker({ log }),
    teardown: async () => {
      for (const lv of await listLvs([VG])) if (lv.origin === name) await sh('lvremove', ['-q', '-f', `${VG}/${lv.name}`]);
      await sh('lvremove', ['-q', '-f', `${VG}/${name}`]);
    },
  };
}

trackerContract('thin-delta (thin_delta on a real thin pool in a user-mode-linux guest)', makeRig);

describe('thin-delta specifics', () => {
  afterAll(async () => {
    await execa('vgremove', ['-q', '-f', VG], { reject: false });
  });

  it('keeps one basis snapshot only while it is the basis; a basis removed outside blocksnap invalidates with the reason', async () => {
    const rig = await makeRig();
    const t = rig.tracker;
    try {
      await t.start({ device: rig.device, chunkSize: CONTRACT_CHUNK, generation: 1 });
      for (let i = 0; i < 3; i++) {
        await t.prepareSwitch();
        await t.completeSwitch();
      }
      const bases = (await listLvs([VG])).filter((l) => l.tags.includes('bsn.basis') && l.origin === rig.device.split('/').pop());
      expect(bases).toHaveLength(1);
      await sh('lvremove', ['-q', '-f', `${VG}/${bases[0]!.name}`]);
      await rig.write(2 * CONTRACT_CHUNK, 4096);
      await t.prepareSwitch();
      const g = await t.completeSwitch();
      expect(g.validity.valid).toBe(false);
      expect(!g.validity.valid && g.validity.reason).toMatch(/basis snapshot .* is gone/);
    } finally {
      if (t.phase !== 'stopped') await t.stop();
      await rig.teardown();
    }
  });

  it('cleanupStale releases a metadata snapshot a killed run left reserved', async () => {
    await (vgReady ?? makeRig());
    await sh('dmsetup', ['message', `${VG}-${POOL}-tpool`, '0', 'reserve_metadata_snap']);
    expect(await cleanupStaleThinDelta()).toContain(`metadata snapshot of ${VG}/${POOL}`);
    expect(await cleanupStaleThinDelta()).toEqual([]);
  });
});
