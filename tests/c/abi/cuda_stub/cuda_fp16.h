/* Stand-in: nccl.h includes it; nothing of it is used by the declarations we check. */
