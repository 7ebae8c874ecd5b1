import { createHash, randomBytes } from 'node:crypto';
import { chunkCountOf, goodChunk, nonZeroIndexes, type ScriptedAgent, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { envelope } from '../../proto/messages.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';

export const MOUNT_WAL_NAME = '000000010000000000000003';
/** 6 MiB: two pieces (4 MiB + 2 MiB), as the agent cuts WAL (DESIGN.md §4.2). */
export const MOUNT_WAL_BYTES = randomBytes(6 << 20);
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest();

/**
 * A PostgreSQL-looking image of `v` made by a scripted agent: the chunks,
 * the backup info (label, stop LSN) and one WAL segment in two pieces.
 */
export async function backupPgImage(a: ScriptedAgent, h: ApplianceHarness, agent: string, v: TestVolume): Promise<string> {
  const job = h.app.router.startJob(agent, v.name, 'full');
  await a.next('runJob', job.id);
  await a.begin(job.id, v);
  await a.next('volumeReady', job.id);
  const idx = nonZeroIndexes(v);
  for (let i = 0; i < idx.length; i += 4) {
    await a.batch(job.id, idx.slice(i, i + 4).map((n) => goodChunk(v, n)));
    await a.next('ack', job.id);
  }
  await a.send(envelope('pgBackupInfo', {
    jobId: job.id, labelFile: 'START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\nCHECKPOINT LOCATION: 0/3000060\n',
    spcmapFile: '', startLsn: '0/3000028', stopLsn: '0/3000138', timeline: 1, replayLsn: '', exclusive: false,
    serverVersion: 150010, role: 'primary', pausedSeconds: 0, backupSeconds: 0.1, walSegmentSize: 16 << 20,
  }));
  for (const offset of [0, 4 << 20]) {
    const plain = MOUNT_WAL_BYTES.subarray(offset, Math.min(offset + (4 << 20), MOUNT_WAL_BYTES.length));
    await a.send(envelope('walPiece', {
      jobId: job.id, fileName: MOUNT_WAL_NAME, offset, data: zstdCompress(plain), plainLength: plain.length, digest: sha(plain),
      fileSize: MOUNT_WAL_BYTES.length,
    }));
  }
  await a.end(job.id, chunkCountOf(v), v);
  const committed = await a.next('committed', job.id);
  await a.result(job.id, true, committed.imageId);
  await job.done;
  return committed.imageId;
}
