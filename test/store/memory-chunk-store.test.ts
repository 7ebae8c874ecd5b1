/**
 * The memory store is held to the same ChunkStore contract as the filesystem
 * store (test/store/fs-chunk-store.test.ts); the crash-recovery cases are
 * about pack files and temp areas, which it does not have (no crash hooks).
 */
import { MemoryChunkBacking, MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { chunkStoreContract } from './chunk-store.contract.js';

chunkStoreContract('MemoryChunkStore', async () => {
  const backing = new MemoryChunkBacking(); // survives close: a reopen sees every flushed blob
  return {
    open: async () => new MemoryChunkStore(backing),
    corruptPayload: async (loc, byteIndex) => backing.corruptAt(loc, byteIndex),
    destroy: async () => undefined,
  };
});
