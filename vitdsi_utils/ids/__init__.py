"""Image IDs: the token codec and prefix trie, and the schemes that give indexed images their IDs."""
