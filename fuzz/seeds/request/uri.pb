
r-1cam-7line-2"default*http://127.0.0.1:8080/a.jpgB
skuB-17