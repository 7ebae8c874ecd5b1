import { dataRanges, holeChunks } from '../blockdev/allocation-map.js';
import { readChunks, type ChunkStream, type ReadPlan } from '../reader/chunk-reader.js';

/**
 * The reader of a snapshot, as both a backup transfer and a tracker audit
 * use it: chunks wholly inside holes of the snapshot file are zero without
 * being read (SEEK_DATA/SEEK_HOLE; a file system that cannot tell reads
 * everything), the rest goes through the worker pool in index order.
 */
export async function readSnapshot(
  plan: Omit<ReadPlan, 'holes'>,
  opts: { workers: number; signal?: AbortSignal },
): Promise<ChunkStream> {
  const ranges = await dataRanges(plan.path).catch(() => null);
  const holes = ranges ? holeChunks(ranges, plan.volumeSize, plan.chunkSize) : undefined;
  return readChunks({ ...plan, holes }, opts);
}
