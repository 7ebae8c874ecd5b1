/**
 * The SnapshotProvider contract (test/agent/snapshot-provider.contract.ts)
 * against lvm-thin and lvm-classic on real LVM in the guest. One volume
 * group per suite, made and removed by the suite.
 */
import { open } from 'node:fs/promises';
import { execa } from 'execa';
import { pino } from 'pino';
import { LvmSnapshotProvider, type LvmSnapshotMode } from '../../../agent/snapshot/lvm/lvm-snapshot-provider.js';
import type { VolumeSpec } from '../../../agent/snapshot/snapshot-provider.js';
import { snapshotProviderContract } from '../../agent/snapshot-provider.contract.js';
import { makeLvmRig } from './lvm-rig.js';

const FILE = 'contract.dat';
const MiB = 1024 * 1024;

function lvmContract(mode: LvmSnapshotMode): void {
  snapshotProviderContract(`lvm-${mode} (real LVM in a user-mode-linux guest)`, async () => {
    const rig = await makeLvmRig({ kind: mode === 'thin' ? 'thin' : 'plain', names: ['cdata', 'cwal'], sizeMiB: 64, poolMiB: 400 });
    const logger = pino({ level: 'silent' });
    return {
      provider: () => new LvmSnapshotProvider({ mode, agent: 'guest1', stateDir: '/tmp/bsn-state', logger, cow: { percent: 25, minBytes: 16 * MiB }, pollMs: 600_000 }),
      volumes: [rig.volumes[0]!, rig.volumes[1]!],
      size: () => 64 * MiB,
      write: async (v: VolumeSpec, data: Buffer) => {
        const fh = await open(`${v.mountpoint}/${FILE}`, 'w');
        try {
          await fh.write(data, 0, data.length, 0);
          await fh.sync();
        } finally {
          await fh.close();
        }
      },
      readBack: async (s) => Buffer.from((await execa('debugfs', ['-R', `cat /${FILE}`, s.path], { encoding: 'buffer', stdin: 'ignore' })).stdout),
      teardown: rig.teardown,
    };
  });
}

lvmContract('thin');
lvmContract('classic');
