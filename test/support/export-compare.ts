import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { exportImage } from '../../appliance/ops/export-image.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import { compareFiles } from './same-bytes.js';

export interface ExportComparison {
  identical: boolean;
  /** Where the files first differ (as cmp would name it), else ''. */
  detail: string;
}

/**
 * Exports an image from the store as a raw file in `scratchDir` and compares
 * it byte for byte with `snapshotFile` (the retained snapshot the image was
 * taken from). The export is removed afterwards whatever the outcome: at
 * volume size, a few of them would fill a test pool.
 */
export async function compareExportWithSnapshot(
  store: ChunkStore, rootDigestHex: string, snapshotFile: string, scratchDir: string,
): Promise<ExportComparison> {
  const out = join(scratchDir, `export-${rootDigestHex.slice(0, 16)}-${process.pid}.raw`);
  try {
    await exportImage(store, rootDigestHex, out);
    return await compareFiles(out, snapshotFile);
  } finally {
    await rm(out, { force: true });
  }
}
