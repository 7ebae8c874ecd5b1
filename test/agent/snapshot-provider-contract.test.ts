/**
 * The SnapshotProvider contract (snapshot-provider.contract.ts) against the
 * reflink provider on two real loop-device volumes (ext4) in XFS reflink
 * pools, and against the fake provider over in-memory volumes.
 */
import { open, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { pino } from 'pino';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import type { VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { FakeSnapshotProvider, FakeVolume } from '../../agent/snapshot/testing/fake-snapshot-provider.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { DATA, debugfsCat, snapshotProviderContract } from './snapshot-provider.contract.js';

const MiB = 1024 * 1024;
const FILE = 'contract.dat';

snapshotProviderContract('reflink (loop devices, ext4 on an XFS reflink pool)', async () => {
  const tmp = await mkdtemp(path.join(os.tmpdir(), 'bsn-snap-contract-'));
  const labs: VolumeLab[] = [];
  const teardown = async () => {
    for (const lab of labs.reverse()) await lab.destroy();
    await rm(tmp, { recursive: true, force: true });
  };
  try {
    for (const name of ['cdata', 'cwal']) {
      labs.push(await createVolumeLab({ poolSize: 400 * MiB, volumeSize: 64 * MiB, name, ledgerDir: path.join(tmp, 'ledgers') }));
    }
  } catch (e) {
    await teardown();
    throw e;
  }
  const [la, lb] = labs as [VolumeLab, VolumeLab];
  const logger = pino({ level: 'silent' });
  return {
    provider: () => new ReflinkSnapshotProvider({ stateDir: path.join(tmp, 'state'), logger, volumes: [la.volume, lb.volume] }),
    volumes: [la.volume, lb.volume],
    size: () => 64 * MiB,
    write: async (v: VolumeSpec, data: Buffer) => {
      const fh = await open(path.join(v.mountpoint, FILE), 'w');
      try {
        await fh.write(data, 0, data.length, 0);
        await fh.sync();
      } finally {
        await fh.close();
      }
    },
    // The snapshot is an unmounted ext4 image: debugfs reads the file out of it.
    readBack: (s) => debugfsCat(s.path, FILE),
    teardown,
  };
});

snapshotProviderContract('fake (in-memory volumes)', async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-fake-snap-'));
  const volumes = [new FakeVolume('fdata', 8 * MiB), new FakeVolume('fwal', 8 * MiB)] as const;
  const OFFSET = 3 * 4096;
  return {
    provider: () => new FakeSnapshotProvider(dir, volumes),
    volumes: [volumes[0].spec, volumes[1].spec],
    size: () => 8 * MiB,
    write: async (v, data) => volumes.find((f) => f.spec.name === v.name)!.write(OFFSET, data),
    readBack: async (s) => (await readFile(s.path)).subarray(OFFSET, OFFSET + DATA),
    teardown: () => rm(dir, { recursive: true, force: true }),
  };
});
