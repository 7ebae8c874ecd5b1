/**
 * An image served as it is: reads and block status straight from the
 * ImageSource, nothing written. Safe for any number of connections (nothing
 * ever changes it), so CAN_MULTI_CONN.
 */
import type { ImageSource } from './image-source.js';
import type { NbdExport } from './nbd-export.js';

export function readOnlyExport(source: ImageSource): NbdExport {
  return {
    size: source.size,
    chunkSize: source.chunkSize,
    readOnly: true,
    canMultiConn: true,
    read: (offset, length) => source.read(offset, length),
    runs: (offset, length, maxRuns) => source.runs(offset, length, maxRuns),
  };
}
