import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { exportImage } from '../../appliance/ops/export-image.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';

export interface ExportComparison {
  identical: boolean;
  /** cmp's report when the files differ (first differing byte), else ''. */
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
    const r = await execa('cmp', [out, snapshotFile], { reject: false, stdin: 'ignore' });
    const identical = r.exitCode === 0;
    return { identical, detail: identical ? '' : `${String(r.stdout)}${String(r.stderr)}`.trim() || `cmp exit ${r.exitCode}` };
  } finally {
    await rm(out, { force: true });
  }
}
