package measure

// sysSyncfs is syncfs(2), which package syscall does not name here.
const sysSyncfs = 306
